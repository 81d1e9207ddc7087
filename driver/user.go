package driver

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/berthd/berth/errdefs"
)

// ResolveUser turns an image's user ("name", "uid", "name:group",
// "uid:gid") into numeric ids, looking names up in the image's own
// /etc/passwd and /etc/group (never the host's). Empty means root.
func ResolveUser(rootfs, user string) (uid, gid uint32, err error) {
	if user == "" {
		return 0, 0, nil
	}
	u, g, hasGroup := strings.Cut(user, ":")
	uid, pwGID, err := lookup(filepath.Join(rootfs, "etc/passwd"), u, true)
	if err != nil {
		return 0, 0, err
	}
	gid = pwGID
	if hasGroup {
		gid, _, err = lookup(filepath.Join(rootfs, "etc/group"), g, false)
		if err != nil {
			return 0, 0, err
		}
	}
	return uid, gid, nil
}

// lookup finds name (or a number) in a passwd- or group-format file. For a
// number in passwd the primary group comes from the file when listed, else
// equals the uid's group 0 as runc does.
func lookup(path, name string, passwd bool) (id, primaryGID uint32, err error) {
	if n, perr := strconv.ParseUint(name, 10, 32); perr == nil {
		id = uint32(n)
		if !passwd {
			return id, 0, nil
		}
	}
	f, ferr := os.Open(path)
	if ferr != nil {
		if id != 0 || name == "0" {
			return id, 0, nil
		}
		return 0, 0, fmt.Errorf("user %q: image has no %s: %w", name, filepath.Base(path), errdefs.ErrInvalidArgument)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) < 3 {
			continue
		}
		if fields[0] != name && fields[2] != name {
			continue
		}
		n, perr := strconv.ParseUint(fields[2], 10, 32)
		if perr != nil {
			continue
		}
		if passwd && len(fields) >= 4 {
			g, gerr := strconv.ParseUint(fields[3], 10, 32)
			if gerr == nil {
				primaryGID = uint32(g)
			}
		}
		return uint32(n), primaryGID, nil
	}
	if _, perr := strconv.ParseUint(name, 10, 32); perr == nil {
		return id, 0, nil
	}
	return 0, 0, fmt.Errorf("user or group %q not found in the image's %s: %w", name, filepath.Base(path), errdefs.ErrInvalidArgument)
}
