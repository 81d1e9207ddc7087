/*
 * berth-entry is the first program of every berth container process.
 *
 * runc sets the process up as the bundle says (namespaces, mounts, user,
 * capabilities, rlimits, no_new_privs) and executes the bundle's args[0],
 * /proc/self/fd/3: this program, which the monitor opened on the host and
 * passed with runc's --preserve-fds. berth-entry then
 *
 *   1. finds the workload's program as runc would (exec.LookPath: a name
 *      with a slash as it is, else the first executable file of that name
 *      in the process's $PATH),
 *   2. drops the ambient and inheritable capabilities the bundle lends it
 *      (so that, as under runc, the lookup and the execve run with the
 *      bundle's capabilities even for a user other than root, and the
 *      workload's execve ends with what runc's would),
 *   3. installs the seccomp filter berth compiled once from the container's
 *      profile (fd 4: struct sock_filter[], see internal/seccomp), and
 *   4. executes the workload with the arguments and environment runc gave.
 *
 * runc would install the same filter itself, but it compiles the profile
 * with libseccomp on every start (about 15 ms of a 40 ms start of
 * /bin/true); berth compiles it once per agent.
 *
 * fd 5 is a pipe to the monitor, close-on-exec: end of file without a byte
 * means the workload was executed; otherwise berth-entry writes why it was
 * not (in runc's words) and exits 127. fds 3 and 4 are closed before the
 * workload runs, so it inherits nothing of berth's.
 *
 * It is freestanding (no C library, raw system calls, x86_64 only): a C
 * library's start-up, or Go's, would give back a good part of what it saves.
 */

#define SYS_read 0
#define SYS_write 1
#define SYS_close 3
#define SYS_stat 4
#define SYS_execve 59
#define SYS_fcntl 72
#define SYS_capget 125
#define SYS_capset 126
#define SYS_prctl 157
#define SYS_exit_group 231
#define SYS_seccomp 317

#define F_SETFD 2
#define FD_CLOEXEC 1
#define PR_SET_DUMPABLE 4
#define PR_SET_NO_NEW_PRIVS 38
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#define LINUX_CAPABILITY_VERSION_3 0x20080522
#define SECCOMP_SET_MODE_FILTER 1
#define S_IFMT 0170000
#define S_IFDIR 0040000

#define FD_SELF 3
#define FD_FILTER 4
#define FD_REPORT 5

/* BPF_MAXINSNS instructions of 8 bytes. */
#define MAX_FILTER (4096 * 8)

typedef unsigned long size_t;

static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

static long sys3(long n, long a, long b, long c) { return sys6(n, a, b, c, 0, 0, 0); }

/* The kernel's struct stat on x86_64. */
struct kstat {
	unsigned long dev, ino, nlink;
	unsigned int mode, uid, gid, pad0;
	unsigned long rdev;
	long size, blksize, blocks;
	unsigned long times[6];
	long reserved[3];
};

struct cap_header {
	unsigned int version;
	int pid;
};

struct cap_data {
	unsigned int effective, permitted, inheritable;
};

struct sock_fprog {
	unsigned short len;
	const void *filter;
};

static unsigned char filter[MAX_FILTER + 8];
static char pathbuf[4096 + 256];
static char msg[8192];
static size_t msglen;

static size_t slen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

static int has_prefix(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

static void put(const char *s)
{
	while (*s && msglen < sizeof msg - 1)
		msg[msglen++] = *s++;
}

static void put_num(long v)
{
	char b[24];
	int i = sizeof b;
	b[--i] = 0;
	if (v < 0)
		v = -v;
	do {
		b[--i] = '0' + v % 10;
		v /= 10;
	} while (v && i > 0);
	put(b + i);
}

/* strerror for what stat and execve return; Go's words, as runc reports. */
static void put_errno(long e)
{
	switch (e) {
	case 1: put("operation not permitted"); return;
	case 2: put("no such file or directory"); return;
	case 7: put("argument list too long"); return;
	case 8: put("exec format error"); return;
	case 12: put("cannot allocate memory"); return;
	case 13: put("permission denied"); return;
	case 14: put("bad address"); return;
	case 20: put("not a directory"); return;
	case 21: put("is a directory"); return;
	case 22: put("invalid argument"); return;
	case 26: put("text file busy"); return;
	case 36: put("file name too long"); return;
	case 40: put("too many levels of symbolic links"); return;
	}
	put("errno ");
	put_num(e);
}

static void fail(void)
{
	const char *p = msg;
	size_t n = msglen;
	while (n > 0) {
		long w = sys3(SYS_write, FD_REPORT, (long)p, (long)n);
		if (w == -4) /* EINTR */
			continue;
		if (w <= 0)
			break;
		p += w;
		n -= w;
	}
	sys3(SYS_exit_group, 127, 0, 0);
	for (;;)
		;
}

/* fail_errno reports what failed and the error the kernel gave. */
static void fail_errno(const char *what, long r)
{
	put(what);
	put(": ");
	put_errno(-r);
	fail();
}

/* exec.LookPath's findExecutable: 0, or the errno that rules the file out. */
static long executable(const char *path)
{
	struct kstat st;
	long r = sys3(SYS_stat, (long)path, (long)&st, 0);
	if (r < 0)
		return -r;
	if ((st.mode & S_IFMT) == S_IFDIR || (st.mode & 0111) == 0)
		return 13; /* EACCES */
	return 0;
}

/* lookpath resolves file against PATH from envp, as exec.LookPath does. */
static const char *lookpath(const char *file, char **envp)
{
	const char *p;
	for (p = file; *p; p++) {
		if (*p == '/') {
			long e = executable(file);
			if (e == 0)
				return file;
			put("exec: \"");
			put(file);
			put("\": ");
			if (e == 13) {
				put("permission denied");
			} else {
				put("stat ");
				put(file);
				put(": ");
				put_errno(e);
			}
			fail();
		}
	}
	const char *path = "";
	for (char **e = envp; *e; e++)
		if (has_prefix(*e, "PATH="))
			path = *e + 5;
	size_t flen = slen(file);
	/* An empty name is found nowhere (as exec.LookPath finds none). */
	while (flen > 0) {
		const char *end = path;
		while (*end && *end != ':')
			end++;
		size_t dlen = end - path;
		const char *dir = path;
		if (dlen == 0) {
			/* An empty element is the current directory. */
			dir = ".";
			dlen = 1;
		}
		if (dlen + 1 + flen < sizeof pathbuf) {
			size_t n = 0;
			for (size_t i = 0; i < dlen; i++)
				pathbuf[n++] = dir[i];
			if (pathbuf[n - 1] != '/')
				pathbuf[n++] = '/';
			for (size_t i = 0; i < flen; i++)
				pathbuf[n++] = file[i];
			pathbuf[n] = 0;
			if (executable(pathbuf) == 0) {
				if (pathbuf[0] != '/') {
					put("exec: \"");
					put(file);
					put("\": cannot run executable found relative to current directory");
					fail();
				}
				return pathbuf;
			}
		}
		if (!*end)
			break;
		path = end + 1;
	}
	put("exec: \"");
	put(file);
	put("\": executable file not found in $PATH");
	fail();
	return 0;
}

__attribute__((used)) void entry(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	char **envp = argv + argc + 1;

	/*
	 * Nothing of the container may trace this process or open its memory
	 * while it runs without its filter. The kernel already makes it
	 * non-dumpable where the container cannot read the program the
	 * monitor passes (execute-only, owned by a user the container's user
	 * namespace does not map); without a user namespace, the container's
	 * root can, so say it again at once.
	 */
	sys6(SYS_prctl, PR_SET_DUMPABLE, 0, 0, 0, 0, 0);
	if (sys3(SYS_fcntl, FD_REPORT, F_SETFD, FD_CLOEXEC) < 0) {
		/* No one to tell: the monitor sees the exit. */
		sys3(SYS_exit_group, 127, 0, 0);
	}
	sys3(SYS_close, FD_SELF, 0, 0);

	size_t n = 0;
	for (;;) {
		long r = sys3(SYS_read, FD_FILTER, (long)(filter + n), sizeof filter - n);
		if (r == -4)
			continue;
		if (r < 0) {
			fail_errno("read the seccomp filter", r);
		}
		if (r == 0)
			break;
		n += r;
		if (n == sizeof filter)
			break;
	}
	sys3(SYS_close, FD_FILTER, 0, 0);
	if (n == 0 || n > MAX_FILTER || n % 8 != 0) {
		put("the seccomp filter is ");
		put_num(n);
		put(" bytes, not a program of up to 4096 instructions");
		fail();
	}
	if (argc < 2) {
		put("berth-entry: no program to run");
		fail();
	}

	const char *path = lookpath(argv[1], envp);

	long r = sys6(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, 0);
	if (r < 0) {
		fail_errno("set no_new_privs", r);
	}
	/*
	 * runc looks the program up and executes it with the capabilities
	 * the bundle gives, even as a user other than root, whose execve then
	 * drops them. The bundle gives them to berth-entry as ambient (and
	 * inheritable) capabilities, which survive runc's execve of a non-root
	 * user's process; take those two back, so the workload's execve
	 * drops the rest as runc's would.
	 */
	r = sys6(SYS_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0, 0);
	if (r < 0) {
		fail_errno("clear the ambient capabilities", r);
	}
	struct cap_header hdr = {LINUX_CAPABILITY_VERSION_3, 0};
	struct cap_data caps[2];
	r = sys3(SYS_capget, (long)&hdr, (long)caps, 0);
	if (r == 0) {
		caps[0].inheritable = 0;
		caps[1].inheritable = 0;
		r = sys3(SYS_capset, (long)&hdr, (long)caps, 0);
	}
	if (r < 0) {
		fail_errno("clear the inheritable capabilities", r);
	}

	struct sock_fprog prog;
	prog.len = (unsigned short)(n / 8);
	prog.filter = filter;
	r = sys3(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, (long)&prog);
	if (r < 0) {
		fail_errno("install the seccomp filter", r);
	}
	r = sys3(SYS_execve, (long)path, (long)(argv + 1), (long)envp);
	put("exec ");
	put(path);
	put(": ");
	put_errno(-r);
	fail();
}

__asm__(".text\n"
	".global _start\n"
	"_start:\n"
	"	xor %rbp, %rbp\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call entry\n"
	"	hlt\n");
