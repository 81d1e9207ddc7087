package openapitest

import (
	"bytes"
	"io"
	"mime"
	"net/http"
	"sync"
	"testing"
)

// Handler wraps h so that every request it serves, and its answer, is
// checked against the document; failures are reported on t when it ends.
func Handler(t testing.TB, h http.Handler) http.Handler {
	t.Helper()
	d, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	rep := newReporter(t)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := readRequestBody(r)
		if err != nil {
			h.ServeHTTP(w, r)
			return
		}
		rec := &recorder{ResponseWriter: w, header: http.Header{}}
		h.ServeHTTP(rec, r)
		if rec.status == 0 {
			rec.status = http.StatusOK
			rec.header = w.Header().Clone()
		}
		d.check(rep, &exchange{
			req: r, reqBody: body, status: rec.status, header: rec.header,
			body: rec.buf.Bytes(), truncated: rec.truncated,
			clientGone: r.Context().Err() != nil && !rec.ended(r),
			// A stream ends when its client goes away: only whole
			// events count.
			bodyPartial: r.Context().Err() != nil,
		})
	})
}

// recorder passes an answer through while keeping its status, headers and
// (up to maxCapture) its body.
type recorder struct {
	http.ResponseWriter
	status    int
	header    http.Header
	buf       bytes.Buffer
	truncated bool
}

func (r *recorder) WriteHeader(code int) {
	// 1xx are informational, but for 101 (a WebSocket's handshake): the
	// connection is handed over, and that is the answer.
	if r.status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		r.status = code
		r.header = r.ResponseWriter.Header().Clone()
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(p []byte) (int, error) {
	if r.status == 0 {
		r.WriteHeader(http.StatusOK)
	}
	if r.buf.Len()+len(p) > maxCapture {
		r.truncated = true
	} else {
		r.buf.Write(p)
	}
	return r.ResponseWriter.Write(p)
}

func (r *recorder) Flush() { _ = r.FlushError() }

func (r *recorder) FlushError() error {
	return http.NewResponseController(r.ResponseWriter).Flush()
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// ended reports whether the handler wrote a whole answer before its
// client left: a stream the client cut still has its status checked.
func (r *recorder) ended(req *http.Request) bool {
	return r.status != 0 && r.status != 499
}

// Transport wraps rt (nil: http.DefaultTransport) so that every request a
// client sends through it, and its answer, is checked against the
// document; failures are reported on t when it ends.
func Transport(t testing.TB, rt http.RoundTripper) http.RoundTripper {
	t.Helper()
	d, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	if rt == nil {
		rt = http.DefaultTransport
	}
	return &transport{d: d, rep: newReporter(t), rt: rt}
}

type transport struct {
	d   *Doc
	rep *reporter
	rt  http.RoundTripper
}

func (tr *transport) RoundTrip(r *http.Request) (*http.Response, error) {
	body, err := readRequestBody(r)
	if err != nil {
		return tr.rt.RoundTrip(r)
	}
	resp, err := tr.rt.RoundTrip(r)
	if err != nil {
		return resp, err
	}
	x := &exchange{req: r, reqBody: body, status: resp.StatusCode, header: resp.Header.Clone()}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// The body is the connection, handed to the client (a WebSocket):
		// the handshake's status and headers are the answer.
		tr.d.check(tr.rep, x)
		return resp, nil
	}
	mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	stream := mt == "text/event-stream" || r.URL.Query().Get("follow") == "true"
	resp.Body = &teeBody{rc: resp.Body, drain: !stream, done: func(data []byte, eof, truncated bool) {
		x.body, x.truncated = data, truncated
		x.bodyPartial = !eof
		tr.d.check(tr.rep, x)
	}}
	return resp, nil
}

// teeBody keeps what the client reads of an answer and has it checked
// when the client closes it.
type teeBody struct {
	rc        io.ReadCloser
	buf       bytes.Buffer
	eof       bool
	truncated bool
	once      sync.Once
	// drain: the answer is not a stream; what the client left unread is
	// read (and checked) on Close.
	drain bool
	done  func(data []byte, eof, truncated bool)
}

func (b *teeBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if b.buf.Len()+n > maxCapture {
		b.truncated = true
	} else {
		b.buf.Write(p[:n])
	}
	if err == io.EOF {
		b.eof = true
	}
	return n, err
}

func (b *teeBody) Close() error {
	if b.drain && !b.eof {
		rest, err := io.ReadAll(io.LimitReader(b.rc, maxCapture))
		b.truncated = b.truncated || b.buf.Len()+len(rest) > maxCapture
		b.buf.Write(rest)
		b.eof = err == nil
	}
	err := b.rc.Close()
	b.once.Do(func() { b.done(b.buf.Bytes(), b.eof, b.truncated) })
	return err
}
