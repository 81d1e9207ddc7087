// Package ptyio wraps a terminal's master side for exec sessions: reads
// that end with io.EOF, and a stdin whose Close types end of file.
package ptyio

import (
	"errors"
	"io"
	"os"
	"sync"
	"syscall"
)

// Reader reads a terminal's output from its master; the EIO a master
// reads once the terminal's last other end closed is its end of file.
type Reader struct{ F *os.File }

func (r Reader) Read(p []byte) (int, error) {
	n, err := r.F.Read(p)
	if err != nil && (errors.Is(err, syscall.EIO) || errors.Is(err, os.ErrClosed)) {
		err = io.EOF
	}
	return n, err
}

// Stdin writes to a terminal through its master; Close types end of file
// (^D) instead of closing the master, which carries the output too.
type Stdin struct {
	F    *os.File
	once sync.Once
}

func (w *Stdin) Write(p []byte) (int, error) { return w.F.Write(p) }

func (w *Stdin) Close() error {
	var err error
	w.once.Do(func() { _, err = w.F.Write([]byte{4}) })
	return err
}
