package daemon_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/internal/config"
)

// TestSlowloris: 500 connections that send their headers a byte at a time
// neither stop the agent from answering others promptly nor stay open
// past the header timeout.
func TestSlowloris(t *testing.T) {
	c, addr := startAgentAddr(t, func(cfg *config.Config) { cfg.API.ReadHeaderTimeout = 3 * time.Second })
	const n = 500
	// prompt is the bound for "still serves": generous, far above the
	// milliseconds these take on an idle agent.
	const prompt = 2 * time.Second

	conns := make([]net.Conn, 0, n)
	for range n {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("connection %d: %v", len(conns), err)
		}
		conns = append(conns, conn)
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, conn := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: berth\r\nX-Slow: "); err != nil {
				return
			}
			tick := time.NewTicker(200 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					if _, err := conn.Write([]byte("a")); err != nil {
						return
					}
				}
			}
		}()
	}

	serves := func(when string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), prompt)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+addr+"/healthz", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s: /healthz did not answer within %v: %v", when, prompt, err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("%s: /healthz %s", when, resp.Status)
		}
		w, err := c.Submit(ctx, sh("echo ok"))
		if err != nil {
			t.Fatalf("%s: submit did not answer within %v: %v", when, prompt, err)
		}
		ctx2, cancel2 := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel2()
		if _, err := c.WaitExit(ctx2, w.ID); err != nil {
			t.Fatalf("%s: %v", when, err)
		}
	}
	time.Sleep(500 * time.Millisecond) // every slow client has started
	serves("during the attack")

	// The server hangs up on each slow client once its header time is up
	// (with a 408 or by closing): none is still open after it.
	deadline := time.Now().Add(3*time.Second + 20*time.Second)
	for i, conn := range conns {
		conn.SetReadDeadline(deadline)
		_, err := io.ReadAll(conn)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("slow connection %d is still open 20 s after the header timeout", i)
		}
	}
	close(stop)
	wg.Wait()
	serves("after the attack")
}
