/*
 * A workload to checkpoint and restore: every kind of state the restorer must
 * bring back, and a status file that shows whether it all still works.
 *
 *   lifecycle DIR [ANON_MB]
 *
 * Threads: main (ticks every 5 ms: bumps a counter, rewrites a word of its data
 * region keeping a running checksum, appends the counter to DIR/log through one
 * fd whose offset must survive, grows the heap), a checker (verifies the
 * checksum), a sleeper (nanosleep loop: the restart path), a waiter (blocked in
 * pthread_cond_wait: a futex without timeout; released by SIGUSR1, then joined).
 * A forked child bumps a counter in anonymous memory shared with the parent.
 * SIGUSR1 has a handler (SA_RESTART, on a sigaltstack); an ITIMER_REAL fires
 * SIGALRM every 20 ms. DIR/mapped is mapped private and partly written (copy on
 * write). DIR/status is rewritten every tick with one line of counters.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct shared { volatile uint64_t child_ticks; };

static volatile sig_atomic_t usr1_count, alarms;
static volatile uint64_t sleeps;
static uint64_t *data, expected, nwords;
static int sum_ok = 1, joined;
static pthread_mutex_t sum_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t wait_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wait_cond = PTHREAD_COND_INITIALIZER;
static int released;

static void on_usr1(int sig) { (void)sig; usr1_count++; }
static void on_alarm(int sig) { (void)sig; alarms++; }

static void *checker(void *arg)
{
	(void)arg;
	for (;;) {
		pthread_mutex_lock(&sum_lock);
		uint64_t sum = 0;
		for (uint64_t i = 0; i < nwords; i++)
			sum += data[i];
		if (sum != expected)
			sum_ok = 0;
		pthread_mutex_unlock(&sum_lock);
		usleep(50000);
	}
	return NULL;
}

static void *sleeper(void *arg)
{
	(void)arg;
	for (;;) {
		struct timespec ts = {0, 20 * 1000 * 1000};
		nanosleep(&ts, NULL);
		sleeps++;
	}
	return NULL;
}

static void *waiter(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&wait_lock);
	while (!released)
		pthread_cond_wait(&wait_cond, &wait_lock);
	pthread_mutex_unlock(&wait_lock);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 2) { fprintf(stderr, "usage: lifecycle DIR [ANON_MB]\n"); return 2; }
	const char *dir = argv[1];
	size_t anon = (size_t)(argc > 2 ? atol(argv[2]) : 16) << 20;
	char path[4096];

	nwords = anon / 8;
	data = mmap(NULL, anon, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	for (uint64_t i = 0; i < nwords; i++)
		expected += data[i] = i * 2654435761u;

	struct shared *sh = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	snprintf(path, sizeof path, "%s/mapped", dir);
	int mfd = open(path, O_RDONLY);
	unsigned char *mapped = mfd >= 0 ? mmap(NULL, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 0) : NULL;
	if (mfd >= 0)
		close(mfd);
	if (mapped)
		for (int off = 0; off < 65536; off += 8192)
			memset(mapped + off, 0xAB, 64); /* copy-on-write pages */

	stack_t ss = {.ss_sp = malloc(65536), .ss_size = 65536};
	sigaltstack(&ss, NULL);
	struct sigaction sa = {.sa_handler = on_usr1, .sa_flags = SA_RESTART | SA_ONSTACK};
	sigaction(SIGUSR1, &sa, NULL);
	struct sigaction al = {.sa_handler = on_alarm, .sa_flags = SA_RESTART};
	sigaction(SIGALRM, &al, NULL);
	struct itimerval it = {{0, 20000}, {0, 20000}};
	setitimer(ITIMER_REAL, &it, NULL);

	pid_t child = fork();
	if (child == 0) {
		for (;;) {
			sh->child_ticks++;
			usleep(5000);
		}
	}

	pthread_t t, w;
	pthread_create(&t, NULL, checker, NULL);
	pthread_create(&t, NULL, sleeper, NULL);
	pthread_create(&w, NULL, waiter, NULL);

	snprintf(path, sizeof path, "%s/log", dir);
	int log = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	snprintf(path, sizeof path, "%s/status", dir);
	int status = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	uint64_t counter = 0, mapped_sum = 0;
	for (;;) {
		counter++;
		pthread_mutex_lock(&sum_lock);
		data[(counter * 7919) % nwords] += 3;
		expected += 3;
		pthread_mutex_unlock(&sum_lock);
		if (counter % 64 == 0)
			free(malloc(1000 + counter % 5000)), (void)sbrk(4096); /* the heap grows */
		char line[256];
		int n = snprintf(line, sizeof line, "%lu\n", (unsigned long)counter);
		write(log, line, n);
		if (usr1_count && !joined) {
			pthread_mutex_lock(&wait_lock);
			released = 1;
			pthread_cond_signal(&wait_cond);
			pthread_mutex_unlock(&wait_lock);
			pthread_join(w, NULL);
			joined = 1;
		}
		mapped_sum = 0;
		if (mapped)
			for (int off = 0; off < 65536; off += 4096)
				mapped_sum += mapped[off] + mapped[off + 100];
		n = snprintf(line, sizeof line,
			     "counter=%lu usr1=%d alarms=%d sleeps=%lu child=%lu joined=%d sum_ok=%d "
			     "mapped=%lu pid=%d ppid=%d child_pid=%d\n",
			     (unsigned long)counter, (int)usr1_count, (int)alarms, (unsigned long)sleeps,
			     (unsigned long)sh->child_ticks, joined, sum_ok, (unsigned long)mapped_sum,
			     getpid(), getppid(), child);
		pwrite(status, line, n, 0);
		ftruncate(status, n);
		usleep(5000);
	}
}
