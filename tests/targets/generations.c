/*
 * A target that never stops writing, for the copy-on-write snapshot tests.
 *
 *   generations [--mb N]
 *
 * Its pages, in one sequence: a private region of N MiB (default 32), 16
 * MADV_DONTFORK pages, 16 MADV_WIPEONFORK pages and 16 MAP_SHARED pages. A
 * writer sweeps the sequence over and over; before writing generation g into
 * the first 8 bytes of page i it stores g << 32 | i into the "clock", a separate
 * MAP_SHARED page, with one 8-byte store. So the memory at any instant obeys:
 * pages before i hold g, pages after i hold g - 1, page i holds either. The rest
 * of every page is a fixed pattern (byte k of page i: (i * 7 + k) & 0xff), which
 * a wiped copy would lose. Prints "REGION name start size" lines, then "READY pid".
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
#define SMALL 16

static unsigned char *map(size_t len, int flags)
{
	unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	return p;
}

int main(int argc, char **argv)
{
	size_t priv_pages = (size_t)32 << 8;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--mb") && i + 1 < argc)
			priv_pages = (size_t)atol(argv[++i]) << 8;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	volatile uint64_t *clock = (volatile uint64_t *)map(PAGE, MAP_SHARED);
	unsigned char *priv = map(priv_pages * PAGE, MAP_PRIVATE);
	unsigned char *dontfork = map(SMALL * PAGE, MAP_PRIVATE);
	unsigned char *wipe = map(SMALL * PAGE, MAP_PRIVATE);
	unsigned char *shared = map(SMALL * PAGE, MAP_SHARED);
	if (madvise(dontfork, SMALL * PAGE, MADV_DONTFORK) || madvise(wipe, SMALL * PAGE, MADV_WIPEONFORK)) {
		perror("madvise");
		return 1;
	}
	size_t total = priv_pages + 3 * SMALL;
	unsigned char **pages = malloc(total * sizeof(*pages));
	for (size_t i = 0; i < total; i++) {
		if (i < priv_pages)
			pages[i] = priv + i * PAGE;
		else if (i < priv_pages + SMALL)
			pages[i] = dontfork + (i - priv_pages) * PAGE;
		else if (i < priv_pages + 2 * SMALL)
			pages[i] = wipe + (i - priv_pages - SMALL) * PAGE;
		else
			pages[i] = shared + (i - priv_pages - 2 * SMALL) * PAGE;
		for (size_t k = 8; k < PAGE; k++)
			pages[i][k] = (unsigned char)((i * 7 + k) & 0xff);
	}
	printf("REGION clock %#lx %d\n", (unsigned long)clock, PAGE);
	printf("REGION private %#lx %zu\n", (unsigned long)priv, priv_pages * PAGE);
	printf("REGION dontfork %#lx %d\n", (unsigned long)dontfork, SMALL * PAGE);
	printf("REGION wipeonfork %#lx %d\n", (unsigned long)wipe, SMALL * PAGE);
	printf("REGION shared %#lx %d\n", (unsigned long)shared, SMALL * PAGE);
	printf("READY %d\n", getpid());
	for (uint64_t g = 1;; g++) {
		for (size_t i = 0; i < total; i++) {
			*clock = g << 32 | i;
			*(volatile uint64_t *)pages[i] = g;
		}
		usleep(200);
	}
}
