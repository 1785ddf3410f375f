/* wpdump-criu-hook: the program CRIU execs as its action script (built by setup.py, installed beside the
 * Python scripts). CRIU runs it for every action, post-dump inside its frozen window, where a Python start-up
 * alone costs 30-40 ms (docs/kernel.md, costs). So this program only:
 *   - exits 0 for the actions wpdump ignores;
 *   - at post-dump, asks the standby the pre-dump step left (plugin/wpdump/dump/hook_standby.py) over its
 *     abstract unix socket and copies its report to stderr;
 *   - for pre-dump, and whenever there is no standby (of ours) to ask or it did not finish, execs
 *     wpdump-criu-hook-py (the Python hook, plugin/wpdump/dump/hook_entry.py) from its own directory, else
 *     from PATH, which then does the work itself.
 * The socket's name and the request are built as hook_standby.socket_name / request say. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define FALLBACK "wpdump-criu-hook-py"
#define REPLY_LIMIT (1 << 20)
#define WAIT_MS (600 * 1000) /* the rewrite of a big tree may take a while; CRIU waits for us anyway */

static const char DONE[] = "\n# done\n"; /* the report's last line: the standby finished */

static void run_python(void)
{
	char path[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - sizeof(FALLBACK) - 1);

	if (n > 0) {
		path[n] = '\0';
		char *slash = strrchr(path, '/');
		if (slash) {
			strcpy(slash + 1, FALLBACK);
			execv(path, (char *[]){ path, NULL });
		}
	}
	execvp(FALLBACK, (char *[]){ FALLBACK, NULL });
	fprintf(stderr, "wpdump criu-hook: cannot run %s (%s): CRIU's images stay as they are\n", FALLBACK,
		strerror(errno));
	exit(0);
}

/* FNV-1a, 64 bits: names the socket together with the uid and the root pid; the request carries the
 * directory itself, which the standby compares with its own. */
static uint64_t fnv1a(const char *s)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
	return h;
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = write(fd, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/* 0 when the standby did the post-dump work and its report went to stderr; -1 otherwise. */
static int ask_standby(const char *images_dir, long root)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int len = snprintf(sa.sun_path + 1, sizeof(sa.sun_path) - 1, "wpdump-criu-hook-%u-%ld-%016llx",
			   (unsigned)geteuid(), root, (unsigned long long)fnv1a(images_dir));
	socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)len);
	struct ucred cred;
	socklen_t credlen = sizeof(cred);
	char *reply = NULL, *req = NULL;
	size_t got = 0;
	int fd, ret = -1;

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&sa, salen) < 0)
		goto out;
	/* someone else may hold the name: only a standby of our own user is trusted */
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &credlen) < 0 || cred.uid != geteuid())
		goto out;
	if (asprintf(&req, "go %s\n", images_dir) < 0) {
		req = NULL;
		goto out;
	}
	if (write_all(fd, req, strlen(req)) < 0)
		goto out;
	reply = malloc(REPLY_LIMIT);
	if (!reply)
		goto out;
	while (got < REPLY_LIMIT) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int r = poll(&p, 1, WAIT_MS);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			goto out;
		ssize_t n = read(fd, reply + got, REPLY_LIMIT - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			goto out;
		if (n == 0)
			break;
		got += (size_t)n;
	}
	/* a standby that died half-way sends no end mark: the Python hook then does the work */
	if (got < sizeof(DONE) - 1 || memcmp(reply + got - (sizeof(DONE) - 1), DONE, sizeof(DONE) - 1))
		goto out;
	write_all(2, reply, got - (sizeof(DONE) - 2)); /* up to the report's last newline */
	ret = 0;
out:
	free(reply);
	free(req);
	close(fd);
	return ret;
}

int main(void)
{
	const char *action = getenv("CRTOOLS_SCRIPT_ACTION");
	const char *dir = getenv("CRTOOLS_IMAGE_DIR");
	const char *root = getenv("CRTOOLS_INIT_PID");
	char images_dir[PATH_MAX];
	char *end;
	long pid;

	if (!action || (strcmp(action, "pre-dump") && strcmp(action, "post-dump")))
		return 0;
	if (!strcmp(action, "post-dump") && dir && root && realpath(dir, images_dir)) {
		errno = 0;
		pid = strtol(root, &end, 10);
		if (!errno && end != root && !*end && pid > 0 && ask_standby(images_dir, pid) == 0)
			return 0;
	}
	run_python();
	return 0;
}
