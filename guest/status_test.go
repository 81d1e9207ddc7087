package guest

import (
	"errors"
	"strings"
	"testing"
)

func TestStatusLines(t *testing.T) {
	for _, tc := range []struct {
		s    Status
		want string
	}{
		{Status{Event: EventStarted, PID: 42}, `{"event":"started","pid":42}`},
		{Status{Event: EventExited}, `{"event":"exited","exit_code":0}`},
		{Status{Event: EventExited, ExitCode: 143, Signal: 15}, `{"event":"exited","exit_code":143,"signal":15}`},
		{Status{Event: EventError, ExitCode: 127, Message: "sh: not found"}, `{"event":"error","exit_code":127,"message":"sh: not found"}`},
	} {
		got := string(tc.s.AppendLine(nil))
		if got != tc.want+"\n" {
			t.Errorf("line = %s, want %s", got, tc.want)
		}
		back, err := ParseStatus([]byte(got))
		if err != nil || back != tc.s {
			t.Errorf("ParseStatus(%s) = %+v, %v; want %+v", got, back, err, tc.s)
		}
	}
}

func TestParseStatusRejectsUnknownEvent(t *testing.T) {
	if _, err := ParseStatus([]byte(`{"event":"rebooted"}`)); err == nil {
		t.Fatal("unknown event accepted")
	}
}

func TestReadLastStatus(t *testing.T) {
	started := `{"event":"started","pid":7}` + "\n"
	for name, tc := range map[string]struct {
		in         string
		wantLast   Event
		wantCode   int
		wantPID    int
		wantErr    error
		wantAnyErr bool
	}{
		"exited":         {in: started + `{"event":"exited","exit_code":3}` + "\n", wantLast: EventExited, wantCode: 3, wantPID: 7},
		"error":          {in: `{"event":"error","exit_code":127,"message":"x"}` + "\n", wantLast: EventError, wantCode: 127},
		"only started":   {in: started, wantLast: EventStarted, wantPID: 7, wantErr: ErrNoResult},
		"empty":          {in: "", wantErr: ErrNoResult},
		"torn last line": {in: started + `{"event":"exi`, wantLast: EventStarted, wantPID: 7, wantErr: ErrNoResult},
		"garbage inside": {in: "nonsense\n" + started, wantAnyErr: true},
		"blank lines":    {in: "\n" + started + "\n" + `{"event":"exited","exit_code":0}` + "\n\n", wantLast: EventExited, wantPID: 7},
	} {
		t.Run(name, func(t *testing.T) {
			last, st, err := ReadLastStatus(strings.NewReader(tc.in))
			if tc.wantAnyErr {
				if err == nil || errors.Is(err, ErrNoResult) {
					t.Fatalf("err = %v, want a parse error", err)
				}
				return
			}
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if tc.wantLast == "" {
				if last != nil {
					t.Fatalf("last = %+v, want none", last)
				}
				return
			}
			if last == nil || last.Event != tc.wantLast || last.ExitCode != tc.wantCode {
				t.Fatalf("last = %+v, want %s/%d", last, tc.wantLast, tc.wantCode)
			}
			if tc.wantPID != 0 && (st == nil || st.PID != tc.wantPID) {
				t.Errorf("started = %+v, want pid %d", st, tc.wantPID)
			}
		})
	}
}
