// Package image is berth's node-local image store: it pulls images from
// registries, imports image archives, keeps their content on disk across
// restarts, and unpacks each image once into a read-only root filesystem
// that the drivers run workloads from.
//
// # On-disk layout
//
// Everything lives under one root directory (by default
// /var/lib/berth/images), on one filesystem so that renames are atomic:
//
//	<root>/                  0700; 0710 to the disk group (WithDiskGroup)
//	  refs.json              index: normalized ref -> manifest digest, config, blob list,
//	                         owners of a private image (owners.go)
//	  blobs/sha256/<hex>     content-addressed blobs: manifests, configs and layers
//	                         exactly as fetched (compressed), mode 0444, dir 0700
//	  rootfs/<hex>/          unpacked, flattened filesystem of the image whose
//	                         manifest digest is sha256:<hex> (rootfs/ is 0700)
//	  disks/<hex>            whole-disk VM images: 0400, or 0440 to the disk
//	                         group (disks/ 0700, or 0710 to it)
//	  tmp/                   in-flight writes, 0700; emptied by New
//
// No host user but root reaches an unpacked tree: it keeps its image's
// setuid binaries, file capabilities and private files, which a local
// user must neither run nor read (perms.go). Only QEMU's group, when set,
// may search its way to the whole-disk images it boots.
//
// Blobs are written to tmp/, checked against their digest (and size, when
// known), fsynced and renamed into blobs/; a blob file that exists is
// therefore complete and correct. refs.json is replaced the same way (write,
// fsync, rename, fsync the directory), so a crash leaves either the old or
// the new index. A rootfs is unpacked into tmp/ and renamed into rootfs/ only
// after the whole tree is on disk (syncfs), so a half-written unpack never
// counts; New deletes whatever tmp/ holds, then removes blobs and rootfs
// directories that nothing needs any more (the leftovers of a crashed pull).
//
// The store keeps exactly one flattened tree per manifest digest: the
// platform-specific image manifest (linux/<host arch>) picked from an index,
// never the index itself. Future per-image derivatives (an ext4 disk for the
// VM driver, say disks/<hex>.ext4) fit beside rootfs/ with the same rules:
// build in tmp/, rename into place, garbage-collect by manifest digest.
//
// # Garbage collection
//
// Content lives as long as something needs it: a ref in refs.json, an
// in-flight pull, import or unpack (held by an in-memory lease), or, through
// the WithInUse hook, a workload that runs from the image. Remove and a tag
// that moves to another image delete what they freed at once; New and Prune
// sweep the whole store. The store knows nothing about workloads itself: the
// agent passes WithInUse so that neither "berth image rm" nor a re-pulled
// "latest" nor a restart deletes a rootfs under a running workload.
//
// # Rootfs contents
//
// Layers are flattened with whiteouts and opaque directories applied. Modes
// (including setuid, setgid and sticky bits), numeric ownership, symlinks,
// hardlinks, file mtimes and the security.capability and other extended
// attributes of regular files are kept. Device nodes and FIFOs are skipped:
// the container runtime and the VM guest init provide /dev themselves, and
// an image should not be able to plant device nodes on the host.
//
// Extraction goes through an os.Root, so no entry, symlink or hardlink can
// create or modify anything outside the target directory, whatever the
// layers hold. Entries with absolute names or names that climb out with "..",
// hardlinks to such names, and entries reached through a symlink that leaves
// the tree make the unpack fail with an ErrInvalidArgument error and leave
// nothing behind. Flattening (go-containerregistry's mutate.Extract) already
// drops two kinds of entries quietly, as overlay semantics demand or for
// safety: anything beneath a path an upper entry made a non-directory (so a
// file "written through" a symlink of the image is dropped), and relative
// symlinks and hardlinks whose target climbs above the root. Absolute symlink
// targets are kept as they are: they resolve inside the container.
//
// # Budgets
//
// Pull and Import unpack the image before they store its ref, within the
// budgets of WithLimits: the apparent size of its files (sparse files
// count whole; runs of zeros are written as holes) and the number of its
// entries. An image over a budget, or a pull, import or unpack while the
// filesystem has less free space than the floor, is an
// ErrResourceExhausted that names the config key, and leaves nothing.
// DiskPressure reports the floor to the agent.
//
// # Registries
//
// Pulls use only registries the operator allows (WithRegistries, see
// Registries), over HTTPS unless listed as insecure; the node's own,
// loopback, link-local and workload-network addresses are reached only
// when named explicitly, whatever a name resolves to, for redirects and
// token services too. Errors of a pull carry berth's words, the
// registry's HTTP status and known error codes, never a response body; a
// registry's 401 and 403 are problems of their own (reasons
// registry_unauthorized and registry_forbidden), not the agent's.
//
// Callers must treat a rootfs as read-only: it is shared by every workload of
// the image. Drivers put a writable layer on top (overlayfs upperdir, a
// copy-on-write disk) rather than writing into it.
//
// # Errors
//
// Errors carry the classes of package errdefs: ErrNotFound for an unknown
// image, ErrInvalidArgument for a bad reference or a bad archive or layer,
// ErrUnavailable when a registry cannot be reached or fails, ErrDenied when
// the operator's registry configuration refuses it, ErrFailedPrecondition
// (with an *api.Problem of reason registry_unauthorized or
// registry_forbidden) when the registry refuses us, ErrResourceExhausted
// for a budget or the free-space floor, ErrFailedPrecondition when Remove
// would pull an image from under its workloads.
package image
