/* A FUSE file system with one file, "data", opened with FOPEN_DIRECT_IO, whose reads are answered only
 * when the test says so: slowfuse MOUNTPOINT PAGES. Speaks the raw /dev/fuse protocol (no libfuse).
 * Prints "ready" once mounted, "read OFFSET SIZE" when a read arrives; a line "go" on stdin answers it
 * (byte k of the file is (k * 7 + 0x5a) & 0xff). Other requests are answered at once meanwhile. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#define BUFSZ (1 << 21)
static int fuse_fd;
static uint64_t file_size;

static void reply(uint64_t unique, int error, const void *data, size_t len)
{
	struct fuse_out_header h = {.len = sizeof h + len, .error = error, .unique = unique};
	char *out = malloc(sizeof h + len);
	memcpy(out, &h, sizeof h);
	if (len)
		memcpy(out + sizeof h, data, len);
	if (write(fuse_fd, out, sizeof h + len) < 0 && errno != ENOENT)
		perror("slowfuse: write");
	free(out);
}

static void fill_attr(struct fuse_attr *a, uint64_t ino)
{
	memset(a, 0, sizeof *a);
	a->ino = ino;
	a->nlink = 1;
	a->blksize = 4096;
	if (ino == FUSE_ROOT_ID) {
		a->mode = S_IFDIR | 0755;
	} else {
		a->mode = S_IFREG | 0444;
		a->size = file_size;
		a->blocks = file_size / 512;
	}
}

static void answer_read(uint64_t unique, const struct fuse_read_in *in)
{
	uint64_t off = in->offset, n = in->size;
	if (off >= file_size)
		n = 0;
	else if (off + n > file_size)
		n = file_size - off;
	unsigned char *data = malloc(n ? n : 1);
	for (uint64_t k = 0; k < n; k++)
		data[k] = (unsigned char)(((off + k) * 7 + 0x5a) & 0xff);
	reply(unique, 0, data, n);
	free(data);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: slowfuse MOUNTPOINT PAGES\n");
		return 2;
	}
	file_size = strtoull(argv[2], NULL, 10) * 4096;
	fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
	if (fuse_fd < 0) {
		perror("slowfuse: /dev/fuse");
		return 1;
	}
	char opts[128];
	snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", fuse_fd);
	if (mount("slowfuse", argv[1], "fuse.slowfuse", MS_NOSUID | MS_NODEV, opts)) {
		perror("slowfuse: mount");
		return 1;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	char *buf = malloc(BUFSZ);
	uint64_t pending = 0; /* unique of the read waiting for "go" */
	struct fuse_read_in pending_in;
	char line[64];
	for (;;) {
		struct pollfd p[2] = {{.fd = fuse_fd, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		if (p[1].revents) {
			if (!fgets(line, sizeof line, stdin))
				return 0;
			if (!strncmp(line, "go", 2) && pending) {
				answer_read(pending, &pending_in);
				pending = 0;
			}
		}
		if (!p[0].revents)
			continue;
		ssize_t n = read(fuse_fd, buf, BUFSZ);
		if (n < 0) {
			if (errno == EINTR || errno == ENOENT || errno == EAGAIN)
				continue;
			return errno == ENODEV ? 0 : 1; /* ENODEV: unmounted */
		}
		struct fuse_in_header *h = (struct fuse_in_header *)buf;
		void *arg = buf + sizeof *h;
		switch (h->opcode) {
		case FUSE_INIT: {
			struct fuse_init_out o = {.major = FUSE_KERNEL_VERSION, .minor = FUSE_KERNEL_MINOR_VERSION,
						  .max_readahead = 0, .max_background = 16,
						  .congestion_threshold = 12, .max_write = 1 << 20, .time_gran = 1,
						  .max_pages = 256};
			reply(h->unique, 0, &o, sizeof o);
			break;
		}
		case FUSE_LOOKUP: {
			if (strcmp((char *)arg, "data")) {
				reply(h->unique, -ENOENT, NULL, 0);
				break;
			}
			struct fuse_entry_out o = {.nodeid = 2, .entry_valid = 3600, .attr_valid = 3600};
			fill_attr(&o.attr, 2);
			reply(h->unique, 0, &o, sizeof o);
			break;
		}
		case FUSE_GETATTR: {
			struct fuse_attr_out o = {.attr_valid = 3600};
			fill_attr(&o.attr, h->nodeid);
			reply(h->unique, 0, &o, sizeof o);
			break;
		}
		case FUSE_OPEN: {
			struct fuse_open_out o = {.fh = 1, .open_flags = FOPEN_DIRECT_IO};
			reply(h->unique, 0, &o, sizeof o);
			break;
		}
		case FUSE_READ: {
			struct fuse_read_in *in = arg;
			if (pending) { /* one read at a time is held; any other is answered at once */
				answer_read(h->unique, in);
				break;
			}
			pending = h->unique;
			pending_in = *in;
			printf("read %llu %u\n", (unsigned long long)in->offset, in->size);
			break;
		}
		case FUSE_RELEASE:
		case FUSE_FLUSH:
			reply(h->unique, 0, NULL, 0);
			break;
		case FUSE_FORGET:
		case FUSE_BATCH_FORGET:
		case FUSE_INTERRUPT:
			break;
		case FUSE_DESTROY:
			reply(h->unique, 0, NULL, 0);
			return 0;
		default:
			reply(h->unique, -ENOSYS, NULL, 0);
		}
	}
}
