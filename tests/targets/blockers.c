/* A main thread asleep in one system call: `blockers CALL`. It prints "ready PID", blocks, and once the call
 * returns prints "CALL RESULT ERRNO" (with " mask 1" where it checks that its signal mask is back: SIGUSR1
 * blocked). Wake-ups: a line on stdin (read, poll, ppoll, ppollmask, select, epoll, futex via a second thread,
 * waitpid and vfork via the child), SIGUSR1 (pause, sigsuspend), SIGUSR2 (sigtimedwait); nanosleep sleeps 6 s. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int word;

static void on_usr1(int s) { (void)s; }

static void *waker(void *arg)
{
	char c;
	(void)arg;
	if (read(0, &c, 1) == 1) {
		__atomic_store_n(&word, 1, __ATOMIC_SEQ_CST);
		syscall(SYS_futex, &word, FUTEX_WAKE, 1, NULL, NULL, 0);
	}
	return NULL;
}

static int usr1_blocked(void)
{
	sigset_t m;
	sigprocmask(SIG_BLOCK, NULL, &m);
	return sigismember(&m, SIGUSR1);
}

int main(int argc, char **argv)
{
	const char *call = argv[1];
	struct pollfd pfd = {.fd = 0, .events = POLLIN};
	struct timespec hour = {3600, 0};
	sigset_t usr1, empty, usr2;
	long r = 0;
	int extra = -1;
	char c;
	struct sigaction sa = {.sa_handler = on_usr1};

	sigaction(SIGUSR1, &sa, NULL);
	sigemptyset(&empty);
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	sigemptyset(&usr2);
	sigaddset(&usr2, SIGUSR2);
	sigprocmask(SIG_BLOCK, &usr2, NULL);
	if (!strcmp(call, "sigsuspend") || !strcmp(call, "ppollmask"))
		sigprocmask(SIG_BLOCK, &usr1, NULL);
	printf("ready %d\n", getpid());
	fflush(stdout);
	errno = 0;
	if (!strcmp(call, "read")) {
		r = read(0, &c, 1);
	} else if (!strcmp(call, "poll")) {
		r = poll(&pfd, 1, 3600 * 1000);
	} else if (!strcmp(call, "ppoll")) {
		r = ppoll(&pfd, 1, &hour, NULL);
	} else if (!strcmp(call, "ppollmask")) {
		r = ppoll(&pfd, 1, &hour, &empty);
		extra = usr1_blocked();
	} else if (!strcmp(call, "select")) {
		fd_set rd;
		struct timeval tv = {3600, 0};
		FD_ZERO(&rd);
		FD_SET(0, &rd);
		r = select(1, &rd, NULL, NULL, &tv);
	} else if (!strcmp(call, "epoll")) {
		int ep = epoll_create1(0);
		struct epoll_event ev = {.events = EPOLLIN};
		epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
		r = epoll_wait(ep, &ev, 1, 3600 * 1000);
	} else if (!strcmp(call, "futex")) {
		pthread_t th;
		pthread_create(&th, NULL, waker, NULL);
		r = syscall(SYS_futex, &word, FUTEX_WAIT, 0, NULL, NULL, 0);
	} else if (!strcmp(call, "waitpid")) {
		pid_t child = fork();
		if (child == 0)
			_exit(read(0, &c, 1) == 1 ? 7 : 1);
		int st;
		r = waitpid(child, &st, 0) == child ? WEXITSTATUS(st) : -1;
	} else if (!strcmp(call, "vfork")) {
		pid_t child = vfork();
		if (child == 0)
			_exit(read(0, &c, 1) == 1 ? 0 : 1);
		r = child > 0 ? 0 : -1;
	} else if (!strcmp(call, "pause")) {
		r = pause();
	} else if (!strcmp(call, "sigsuspend")) {
		r = sigsuspend(&empty);
		extra = usr1_blocked();
	} else if (!strcmp(call, "sigtimedwait")) {
		r = sigtimedwait(&usr2, NULL, &hour);
	} else if (!strcmp(call, "nanosleep")) {
		struct timespec t0, t1, six = {6, 0};
		clock_gettime(CLOCK_MONOTONIC, &t0);
		r = nanosleep(&six, NULL);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		if (t1.tv_sec - t0.tv_sec < 6 && !(t1.tv_sec - t0.tv_sec == 5 && t1.tv_nsec > t0.tv_nsec))
			r = 99; /* woke early */
	}
	if (extra >= 0)
		printf("%s %ld %d mask %d\n", call, r, errno, extra);
	else
		printf("%s %ld %d\n", call, r, errno);
	fflush(stdout);
	return 0;
}
