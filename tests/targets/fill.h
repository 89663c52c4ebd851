/*
 * The deterministic page contents of the test and benchmark targets: a mix of
 * zero pages (one in 64 of them never touched, a hole), text, pointer-like words
 * and noise, so a faithful copy can be told from a wrong one and compression
 * sees realistic data. Shared by tests/targets/target.c and
 * scripts/bench_lib/writer.c.
 */
#ifndef CHECKPOINTER_FILL_H
#define CHECKPOINTER_FILL_H

#include <stddef.h>
#include <stdint.h>

#define PAGE 4096UL

static void fill(unsigned char *p, size_t len, uint64_t seed)
{
	/* Mixed content: a zero page, text, pointer-like words and noise. */
	for (size_t off = 0; off < len; off += PAGE) {
		uint64_t *w = (uint64_t *)(p + off);
		uint64_t pg = off / PAGE + seed;
		switch (pg % 4) {
		case 0:
			/* Zeros: mostly written (present zero-filled pages), one in 64 never
			 * touched (a hole that must read back as zeros). */
			if (pg % 64)
				((volatile unsigned char *)p)[off] = 0;
			break;
		case 1:
			for (size_t i = 0; i < PAGE; i++)
				p[off + i] = "checkpoint text "[i % 16];
			break;
		case 2:
			for (size_t i = 0; i < PAGE / 8; i++)
				w[i] = 0x7f0000000000ULL + pg * PAGE + i * 8;
			break;
		default: {
			uint64_t x = pg * 0x9E3779B97F4A7C15ULL + 1;
			for (size_t i = 0; i < PAGE / 8; i++) {
				x ^= x << 13; x ^= x >> 7; x ^= x << 17;
				w[i] = x;
			}
		}
		}
	}
}

#endif
