/* A target under seccomp. `seccomp MODE`: a filter that answers userfaultfd() with MODE (kill = KILL_THREAD,
 * killproc = KILL_PROCESS, trap = TRAP, errno = ERRNO(EPERM), Docker's answer), or `seccomp strict`
 * (SECCOMP_MODE_STRICT: only read, write, exit, sigreturn), or none. fd 323 (= userfaultfd's syscall number, what a
 * trapped call returns) is open on /dev/null. One-byte commands on stdin: 'w' adds 1 to the first byte of each
 * page of its buffer and replies "ok", 's' replies "sigsys N fd323 OK|BAD" (not in strict mode), EOF exits. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PAGES 64
static volatile int sigsys;
static char buf[PAGES * 4096] __attribute__((aligned(4096)));

static void on_sigsys(int s) { (void)s; sigsys++; }
static void say(const char *s) { (void)!write(1, s, strlen(s)); }

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "errno";
	char line[96];
	int fd = open("/dev/null", O_RDONLY);
	dup2(fd, 323);
	close(fd);
	struct sigaction sa = {.sa_handler = on_sigsys};
	sigaction(SIGSYS, &sa, NULL);
	memset(buf, 1, sizeof buf);
	snprintf(line, sizeof line, "ready %d\n", getpid()); /* getpid is not allowed in strict mode */
	if (!strcmp(mode, "none")) {
	} else if (!strcmp(mode, "strict")) {
		if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT, 0, 0, 0))
			return 1;
	} else {
		unsigned ret = !strcmp(mode, "kill")       ? SECCOMP_RET_KILL_THREAD
			       : !strcmp(mode, "killproc") ? SECCOMP_RET_KILL_PROCESS
			       : !strcmp(mode, "trap")     ? SECCOMP_RET_TRAP
							   : SECCOMP_RET_ERRNO | 1;
		struct sock_filter f[] = {
			BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
			BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 323, 0, 1),
			BPF_STMT(BPF_RET | BPF_K, ret),
			BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		};
		struct sock_fprog prog = {sizeof f / sizeof f[0], f};
		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
			return 1;
	}
	say(line);
	for (;;) {
		char c;
		if (read(0, &c, 1) != 1)
			syscall(SYS_exit, 0); /* exit_group is not allowed in strict mode */
		if (c == 'w') {
			for (int i = 0; i < PAGES; i++)
				buf[i * 4096]++;
			say("ok\n");
		} else if (c == 's') {
			snprintf(line, sizeof line, "sigsys %d fd323 %s\n", sigsys, fcntl(323, F_GETFD) >= 0 ? "OK" : "BAD");
			say(line);
		}
	}
}
