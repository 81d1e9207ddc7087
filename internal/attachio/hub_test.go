package attachio

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync"
	"testing"
)

func TestReplayThenLiveExactlyOnce(t *testing.T) {
	h := NewHub(16, 1<<20)
	fmt.Fprint(h, "0123456789abcdefXYZ") // 19 bytes: the ring keeps the newest 16
	s := h.Subscribe(true)
	fmt.Fprint(h, "live")
	h.Close()
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "3456789abcdefXYZlive" {
		t.Fatalf("read %q, %v; want the newest 16 bytes, then the live output, then EOF", got, err)
	}
	// Without replay: only what follows.
	h2 := NewHub(16, 1<<20)
	fmt.Fprint(h2, "before")
	s2 := h2.Subscribe(false)
	fmt.Fprint(h2, "after")
	h2.Close()
	if got, _ := io.ReadAll(s2); string(got) != "after" {
		t.Errorf("without replay read %q, want after", got)
	}
	// A subscriber of a closed hub reads the replay and ends.
	if got, err := io.ReadAll(h.Subscribe(true)); err != nil || string(got) != "789abcdefXYZlive" {
		t.Errorf("late subscriber read %q, %v", got, err)
	}
}

// Concurrent writes while subscribing: every subscriber with replay sees a
// contiguous tail of the whole stream, ending where the stream ends.
func TestSubscribeDuringWrites(t *testing.T) {
	h := NewHub(1<<20, 64<<20)
	var want bytes.Buffer
	var wg sync.WaitGroup
	subs := make(chan *Sub, 100)
	wg.Go(func() {
		for i := range 100 {
			subs <- h.Subscribe(i%2 == 0)
		}
		close(subs)
	})
	for i := range 5000 {
		line := fmt.Sprintf("line %d\n", i)
		want.WriteString(line)
		h.Write([]byte(line))
	}
	wg.Wait()
	h.Close()
	for s := range subs {
		got, err := io.ReadAll(s)
		if err != nil || !bytes.HasSuffix(want.Bytes(), got) {
			t.Fatalf("a subscriber read %d bytes (%v), not a tail of the stream", len(got), err)
		}
	}
}

func TestSlowSubscriberIsDroppedWithoutBlocking(t *testing.T) {
	h := NewHub(0, 100)
	slow, fast := h.Subscribe(false), h.Subscribe(false)
	chunk := bytes.Repeat([]byte("x"), 10)
	buf := make([]byte, 10)
	for range 1000 {
		h.Write(chunk) // never blocks: nobody reads slow
		if _, err := io.ReadFull(fast, buf); err != nil {
			t.Fatalf("the subscriber that keeps up: %v", err)
		}
	}
	select {
	case <-slow.Slow():
	default:
		t.Errorf("Slow() is not closed for a dropped subscriber")
	}
	select {
	case <-fast.Slow():
		t.Errorf("Slow() is closed for a subscriber that keeps up")
	default:
	}
	h.Close()
	if _, err := slow.Read(buf); !errors.Is(err, ErrSlow) {
		t.Errorf("slow subscriber read %v, want ErrSlow", err)
	}
	if _, err := fast.Read(buf); err != io.EOF {
		t.Errorf("the subscriber that kept up ends with %v, want EOF", err)
	}
}

func TestCloseWakesAReader(t *testing.T) {
	h := NewHub(0, 0)
	s := h.Subscribe(false)
	errc := make(chan error, 1)
	go func() { _, err := s.Read(make([]byte, 1)); errc <- err }()
	s.Close()
	if err := <-errc; !errors.Is(err, io.ErrClosedPipe) {
		t.Errorf("read after Close: %v", err)
	}
	h.Write([]byte("after")) // a closed subscriber is gone from the hub
	if len(h.subs) != 0 {
		t.Errorf("hub still holds %d subscribers", len(h.subs))
	}
}

// The replay is always the newest bytes written, whatever the sizes of
// the writes against the ring's (it wraps around).
func TestReplayWrapsAround(t *testing.T) {
	const ringSize = 100
	h := NewHub(ringSize, 1<<20)
	var all []byte
	for i := range 500 {
		size := []int{0, 1, 7, 33, 99, 100, 101, 250}[i%8]
		p := bytes.Repeat([]byte{byte('a' + i%26)}, size)
		p = append(p, fmt.Sprint(i)...)
		h.Write(p)
		all = append(all, p...)
		s := h.Subscribe(true)
		got := string(s.buf)
		s.Close()
		if want := string(all[max(0, len(all)-ringSize):]); got != want {
			t.Fatalf("after write %d (%d bytes): replay %q, want %q", i, len(p), got, want)
		}
	}
}
