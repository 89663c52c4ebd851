/*
 * Benchmark helper: a process holding N MiB of mixed data (the fill() pattern of
 * tests/targets/target.c) that writes to it on demand or at a fixed rate.
 *
 *   bench-writer --mb N [--rate-pct P]
 *
 * Prints "READY pid" once the memory is filled. --rate-pct P: a thread writes one
 * word in P% of the pages every second (in 10 slices, moving through the buffer).
 * Commands on stdin (one per line), each answered with one line:
 *   pass   -> "PASS ns": memset the whole buffer once, timed with CLOCK_MONOTONIC
 * At EOF on stdin the main thread sleeps forever.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "../../tests/targets/fill.h"

static unsigned char *buf;
static size_t size;
static double rate_pct;


static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void *rate_writer(void *arg)
{
	(void)arg;
	size_t pages = size / PAGE, cursor = 0;
	size_t per_slice = (size_t)(pages * rate_pct / 100.0 / 10.0);
	if (per_slice == 0)
		per_slice = 1;
	uint64_t n = 0;
	for (;;) {
		for (size_t i = 0; i < per_slice; i++) {
			*(volatile uint64_t *)(buf + cursor * PAGE + 8 * (n % 512)) = n;
			cursor = (cursor + 1) % pages;
		}
		n++;
		usleep(100000);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	size = 64UL << 20;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--mb")) size = (size_t)atol(argv[++i]) << 20;
		else if (!strcmp(argv[i], "--rate-pct")) rate_pct = atof(argv[++i]);
		else { fprintf(stderr, "unknown option %s\n", argv[i]); return 2; }
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) { perror("mmap"); return 1; }
	fill(buf, size, 0);
	pthread_t t;
	if (rate_pct > 0)
		pthread_create(&t, NULL, rate_writer, NULL);
	printf("READY %d\n", getpid());
	char line[64];
	unsigned gen = 1;
	while (fgets(line, sizeof line, stdin)) {
		if (!strncmp(line, "pass", 4)) {
			uint64_t t0 = now_ns();
			memset(buf, (int)(gen++ & 0xff), size);
			printf("PASS %llu\n", (unsigned long long)(now_ns() - t0));
		}
	}
	for (;;)
		pause();
}
