package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/berthd/berth/api"
)

// browser is a headless Chromium (Debian's chromium package) driven over
// the DevTools protocol, which records every console error, uncaught
// exception and error entry of the browser log (CSP violations, failed
// loads) of the pages it shows.
type browser struct {
	t     *testing.T
	ctx   context.Context
	allow func(m chromedp.ConsoleMessage) bool
	mu    sync.Mutex
	errs  []string
}

func newBrowser(t *testing.T, allow func(m chromedp.ConsoleMessage) bool) *browser {
	t.Helper()
	var path string
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			path = p
			break
		}
	}
	if path == "" {
		t.Skip("headless Chromium is not installed: `make deps` installs Debian's chromium package (apt-get install chromium)")
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.NoSandbox, // tests run as root
		chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(allocCtx)
	b := &browser{t: t, ctx: ctx, allow: allow}
	// Subscribing starts the browser, before any page is loaded.
	messages := chromedp.Console(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for m, err := range messages {
			if err != nil {
				return
			}
			if m.Type != chromedp.ConsoleError && m.Type != chromedp.ConsoleException {
				continue
			}
			if b.allow != nil && b.allow(m) {
				continue
			}
			b.mu.Lock()
			b.errs = append(b.errs, fmt.Sprintf("%s (%s %s)", m, m.Source, m.URL))
			b.mu.Unlock()
		}
	}()
	// Closed before the agent's server, whose streams it holds.
	t.Cleanup(func() {
		cancel()
		cancelAlloc()
		<-done
	})
	if _, err := chromedp.Run(ctx, chromedp.Evaluate[string]("navigator.userAgent")); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	return b
}

// noErrors fails the test with every console error the pages logged.
func (b *browser) noErrors() {
	b.t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, e := range b.errs {
		b.t.Errorf("the page logged an error: %s", e)
	}
}

func (b *browser) do(steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, time.Minute)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		b.t.Fatal(err)
	}
}

// eval evaluates a JavaScript expression in the page.
func eval[T any](b *browser, expr string) T {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, time.Minute)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		b.t.Fatalf("%s: %v", expr, err)
	}
	return v
}

// waitFor polls a JavaScript expression until it is true; what says what
// is awaited, and show (an expression) what the page shows instead.
func (b *browser) waitFor(what, expr, show string) {
	b.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !eval[bool](b, "!!("+expr+")") {
		if time.Now().After(deadline) {
			b.t.Fatalf("the page never showed %s; it shows:\n%s", what, eval[string](b, show))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (e *env) submitJSON(body string) *api.Workload {
	e.t.Helper()
	resp := e.do("POST", "/v1/workloads", "application/json", strings.NewReader(body))
	defer resp.Body.Close()
	var w api.Workload
	if err := json.NewDecoder(resp.Body).Decode(&w); err != nil || resp.StatusCode != http.StatusCreated {
		e.t.Fatalf("submit: %s %v", resp.Status, err)
	}
	return &w
}

// stateJS is the state the node page shows for a workload.
func stateJS(id string) string {
	return fmt.Sprintf(`(document.querySelector('tr[data-id="%s"] .state') || {}).textContent`, id)
}

// TestNodePageInBrowser loads the node page in headless Chromium against
// a real agent (fake driver): it shows the node's capacity as bars, its
// drivers and a workload the test submitted; when the workload ends, its
// state turns to exited on the same page, without a reload; a workload's
// page shows its placement and follows its logs. No page logs an error.
func TestNodePageInBrowser(t *testing.T) {
	e := newEnv(t)
	resp := e.do("GET", "/", "", nil)
	resp.Body.Close()
	csp := resp.Header.Get("Content-Security-Policy")
	if resp.StatusCode != http.StatusOK || !strings.Contains(csp, "script-src 'self'") || strings.Contains(csp, "unsafe") || !strings.Contains(csp, "default-src 'none'") {
		t.Fatalf("GET /: %s, Content-Security-Policy %q", resp.Status, csp)
	}

	sleeper := e.submitJSON(`{"name":"ui-sleeper","image":"` + testImage + `","command":["sleep","60"]}`)
	talker := e.submitJSON(`{"name":"ui-talker","image":"` + testImage + `","command":["sh","-c","echo hello-from-the-page; echo on-stderr >&2; sleep 60"]}`)

	b := newBrowser(t, nil)
	b.do(chromedp.Navigate(e.srv.URL + "/"))
	b.waitFor("the submitted workload running", stateJS(sleeper.ID)+` === "running"`, `document.getElementById("workloads").innerText`)
	b.waitFor("capacity bars and a healthy container driver",
		`document.querySelectorAll("#bars meter").length >= 2 && (document.querySelector('tr[data-driver="container"] td:nth-child(2)') || {}).textContent === "healthy"`,
		`document.getElementById("main").innerText`)
	b.waitFor("the workload's start among recent events",
		`[...document.querySelectorAll("#events-list li")].some(li => li.textContent.includes("workload.started") && li.textContent.includes("`+sleeper.ID+`"))`,
		`document.getElementById("events").innerText`)
	if eval[int](b, `document.querySelectorAll("#conditions .cond").length`) == 0 {
		t.Error("the page shows no node conditions")
	}
	// A mark only this page load holds: a reload would lose it.
	eval[bool](b, `window.berthMark = "this load"; true`)

	resp = e.do("POST", "/v1/workloads/"+sleeper.ID+"/stop?wait=false&timeout=1s", "", nil)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("stop: %s", resp.Status)
	}
	b.waitFor("the workload exited", stateJS(sleeper.ID)+` === "exited"`, `document.getElementById("workloads").innerText`)
	if mark := eval[string](b, `window.berthMark || "reloaded"`); mark != "this load" {
		t.Errorf("the page reloaded to show the new state (mark %q)", mark)
	}

	// The workload's own page: placement and followed logs.
	b.do(chromedp.Navigate(e.srv.URL + "/workloads/" + talker.ID))
	b.waitFor("the workload's output", `document.getElementById("log-lines").textContent.includes("hello-from-the-page") && document.querySelector("#log-lines .stderr") !== null`,
		`document.getElementById("main").innerText`)
	b.waitFor("the placement explanation", `document.getElementById("placement-explanation").textContent.length > 0 && document.querySelector("#workload-facts .state").textContent === "running"`,
		`document.getElementById("main").innerText`)
	resp = e.do("POST", "/v1/workloads/"+talker.ID+"/stop?wait=false&timeout=1s", "", nil)
	resp.Body.Close()
	b.waitFor("the workload exited on its page", `document.querySelector("#workload-facts .state").textContent === "exited" && document.getElementById("logs-state").textContent === "(ended)"`,
		`document.getElementById("main").innerText`)
	b.noErrors()
}

// TestNodePageAsksForAToken: with auth on, the page without a token shows
// the 401 prompt; a reader's token, entered once, shows what a reader may
// read (the node, events) and says what it may not (workloads); the token
// is in the tab's session storage, never in the URL or a cookie; an
// admin's token shows the workloads.
func TestNodePageAsksForAToken(t *testing.T) {
	e := newAuthEnv(t)
	w := e.submit("paged", "")
	e.waitRunning("paged")
	// The agent's refusals are the point here; Chromium logs each as a
	// failed load. Anything else is an error.
	b := newBrowser(t, func(m chromedp.ConsoleMessage) bool {
		return m.Source == "network" && (strings.Contains(m.Text, "status of 401") || strings.Contains(m.Text, "status of 403"))
	})
	b.do(chromedp.Navigate(e.srv.URL + "/"))
	b.waitFor("the 401 prompt", `!document.getElementById("login").hidden && document.getElementById("main").hidden && document.getElementById("login-msg").textContent.includes("401")`,
		`document.body.innerText`)

	b.do(chromedp.SendKeys(chromedp.CSS("#token"), e.tokens["reader"]), chromedp.Click(chromedp.CSS("#login-form button")))
	b.waitFor("the node as a reader sees it", `document.getElementById("login").hidden && document.querySelectorAll("#bars meter").length >= 2`,
		`document.body.innerText`)
	b.waitFor("that a reader may not list workloads", `document.getElementById("workloads-note").textContent.includes("403")`,
		`document.getElementById("workloads").innerText`)
	where := eval[struct{ URL, Cookie, Stored string }](b, `({URL: location.href, Cookie: document.cookie, Stored: sessionStorage.getItem("berth.token") || ""})`)
	if strings.Contains(where.URL, "berth_") || where.Cookie != "" || where.Stored != e.tokens["reader"] {
		t.Errorf("the token: URL %q, cookies %q, session storage %q", where.URL, where.Cookie, where.Stored)
	}

	b.do(chromedp.Click(chromedp.CSS("#forget")))
	b.waitFor("the prompt again", `!document.getElementById("login").hidden`, `document.body.innerText`)
	b.do(chromedp.SendKeys(chromedp.CSS("#token"), e.tokens["admin"]), chromedp.Click(chromedp.CSS("#login-form button")))
	b.waitFor("the workload, as an admin", stateJS(w.ID)+` === "running"`, `document.body.innerText`)
	b.noErrors()
}

// TestNodePageSurvivesALostStream breaks the page's connections to the
// agent on purpose: the page reconnects to the event stream where it left
// off and still shows the workload's end, without a reload.
func TestNodePageSurvivesALostStream(t *testing.T) {
	e := newEnv(t)
	w := e.submitJSON(`{"name":"ui-cut","image":"` + testImage + `","command":["sleep","60"]}`)
	// The cut streams are the point here; Chromium logs each as a failed
	// load. Anything else is an error.
	b := newBrowser(t, func(m chromedp.ConsoleMessage) bool {
		return m.Source == "network" && strings.Contains(m.Text, "net::ERR_")
	})
	b.do(chromedp.Navigate(e.srv.URL + "/"))
	b.waitFor("the workload running", stateJS(w.ID)+` === "running"`, `document.getElementById("workloads").innerText`)
	eval[bool](b, `window.berthMark = "this load"; true`)

	e.srv.CloseClientConnections()
	b.waitFor("that the stream was lost", `document.getElementById("conn").textContent === "reconnecting"`, `document.getElementById("conn").textContent`)
	resp := e.do("POST", "/v1/workloads/"+w.ID+"/stop?wait=false&timeout=1s", "", nil)
	resp.Body.Close()
	b.waitFor("the workload exited after the reconnect", stateJS(w.ID)+` === "exited" && document.getElementById("conn").textContent === "live"`,
		`document.getElementById("conn").textContent + "\n" + document.getElementById("workloads").innerText`)
	b.waitFor("the exit among the recent events",
		`[...document.querySelectorAll("#events-list li")].some(li => li.textContent.includes("workload.exited") && li.textContent.includes("`+w.ID+`"))`,
		`document.getElementById("events").innerText`)
	if mark := eval[string](b, `window.berthMark || "reloaded"`); mark != "this load" {
		t.Errorf("the page reloaded (mark %q)", mark)
	}
	// Resumed where it left off: no event twice.
	ids := eval[[]string](b, `[...document.querySelectorAll("#events-list li")].map(li => li.dataset.eventId)`)
	seen := map[string]bool{}
	for _, id := range ids {
		if seen[id] {
			t.Errorf("event %s is shown twice after the reconnect", id)
		}
		seen[id] = true
	}
	b.noErrors()
}
