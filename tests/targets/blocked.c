/* A target blocked in a system call: `blocked read` reads its stdin pipe, `blocked sleep MS` sleeps,
 * `blocked futex` waits on a condition variable that a second thread signals after reading stdin.
 * Each prints what the call returned once it completes. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int flag;
static char got[256];

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void *reader(void *arg)
{
	ssize_t n = read(0, got, sizeof got - 1);
	pthread_mutex_lock(&mu);
	flag = (int)n;
	pthread_cond_signal(&cv);
	pthread_mutex_unlock(&mu);
	return NULL;
}

int main(int argc, char **argv)
{
	printf("ready %d\n", getpid());
	fflush(stdout);
	if (!strcmp(argv[1], "read")) {
		char buf[256] = "";
		ssize_t n = read(0, buf, sizeof buf - 1);
		printf("read %zd %s\n", n, buf);
	} else if (!strcmp(argv[1], "sleep")) {
		long ms = atol(argv[2]);
		struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
		double t0 = now_ms();
		int r = nanosleep(&ts, NULL);
		printf("slept %d %.0f\n", r, now_ms() - t0);
	} else {
		pthread_t th;
		pthread_create(&th, NULL, reader, NULL);
		pthread_mutex_lock(&mu);
		while (!flag)
			pthread_cond_wait(&cv, &mu);
		pthread_mutex_unlock(&mu);
		pthread_join(th, NULL);
		printf("woke %d %s\n", flag, got);
	}
	fflush(stdout);
	return 0;
}
