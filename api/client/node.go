package client

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/berthd/berth/api"
)

// Node returns the node-status document and its index. With opts it is a
// blocking query: it returns once the node's index passes opts.WaitIndex
// or after opts.WaitTime.
//
// A fleet controller's loop:
//
//	var index uint64
//	for {
//		n, idx, err := c.Node(ctx, &client.QueryOptions{WaitIndex: index, WaitTime: time.Minute})
//		if err != nil { /* back off, retry */ }
//		if idx < index { idx = 0 } // the node's state was reset
//		index = idx
//		observe(n)
//	}
func (c *Client) Node(ctx context.Context, opts *QueryOptions) (*api.Node, uint64, error) {
	var n api.Node
	idx, err := c.doJSON(ctx, http.MethodGet, "/v1/node", opts.values(nil), nil, &n)
	return &n, idx, err
}

// EventOptions select events.
type EventOptions struct {
	// Since resumes after the event with this id (0: only new events).
	Since      uint64
	WorkloadID string
	// Types are exact event types or families ending in "." ("workload.").
	Types []string
	// NoReconnect makes Events return when the stream breaks instead of
	// reconnecting with Last-Event-ID.
	NoReconnect bool
}

// Events streams the node's events to fn until ctx ends or fn returns an
// error. When the connection breaks it reconnects with the last event's id
// as Last-Event-ID, so no event the agent still holds is missed. lost, if
// not nil, is called when the agent says events were dropped.
func (c *Client) Events(ctx context.Context, opts EventOptions, lost func(), fn func(api.Event) error) error {
	last := opts.Since
	delay := 100 * time.Millisecond
	for {
		got, err := c.eventStream(ctx, opts, last, lost, func(e api.Event) error {
			last = e.ID
			return fn(e)
		})
		if ctx.Err() != nil {
			return nil
		}
		var cbErr callbackError
		if errors.As(err, &cbErr) {
			return cbErr.err
		}
		var p *api.Problem
		if errors.As(err, &p) || opts.NoReconnect {
			return err
		}
		if got {
			delay = 100 * time.Millisecond
		}
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return nil
		}
		delay = min(delay*2, 5*time.Second)
	}
}

type callbackError struct{ err error }

func (e callbackError) Error() string { return e.err.Error() }

// eventStream reads one connection's events. got reports whether any
// arrived.
func (c *Client) eventStream(ctx context.Context, opts EventOptions, last uint64, lost func(), fn func(api.Event) error) (got bool, err error) {
	q := url.Values{}
	if opts.WorkloadID != "" {
		q.Set("workload", opts.WorkloadID)
	}
	for _, t := range opts.Types {
		q.Add("type", t)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url("/v1/events", q), nil)
	if err != nil {
		return false, err
	}
	req.Header.Set("Accept", "text/event-stream")
	if last > 0 {
		req.Header.Set("Last-Event-ID", strconv.FormatUint(last, 10))
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return false, fmt.Errorf("berth agent at %s: %w", c.base.Host, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return false, decodeProblem(resp)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var data strings.Builder
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if data.Len() == 0 {
				continue
			}
			var e api.Event
			if err := json.Unmarshal([]byte(data.String()), &e); err != nil {
				return got, fmt.Errorf("decode event: %w", err)
			}
			data.Reset()
			got = true
			if err := fn(e); err != nil {
				return got, callbackError{err}
			}
		case strings.HasPrefix(line, ":"):
			if strings.Contains(line, "dropped") && lost != nil {
				lost()
			}
		case strings.HasPrefix(line, "data:"):
			data.WriteString(strings.TrimPrefix(strings.TrimPrefix(line, "data:"), " "))
		}
	}
	if err := sc.Err(); err != nil {
		return got, err
	}
	return got, errors.New("event stream ended")
}
