/*
 * dirtier: the test guest's workload. Fills most of RAM with incompressible
 * data that can be recomputed from (page index, generation), keeps rewriting
 * a working set (so that a live migration sees a steady dirty rate), and
 * re-verifies all of its memory continuously, so that any page lost or
 * corrupted by a migration is found by the guest itself.
 *
 * Each page: 16-byte header {magic, index, generation} + xorshift stream
 * seeded from (index, generation). The expected generation of every page
 * lives in a separate table: a page that silently reverts to an older but
 * self-consistent version (a lost write) still fails verification.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <time.h>

#define PAGE 4096u
#define MAGIC 0x44495254u /* "DIRT" */

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t mix(uint64_t x)
{
	/* splitmix64 finaliser: decorrelates neighbouring seeds */
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

struct hdr {
	uint32_t magic;
	uint32_t index;
	uint64_t gen;
};

static void fill_page(uint64_t *p, uint64_t index, uint64_t gen)
{
	struct hdr *h = (struct hdr *)p;
	uint64_t s = mix(index * 0x100000001b3ull ^ mix(gen)) | 1;
	h->magic = MAGIC;
	h->index = (uint32_t)index;
	h->gen = gen;
	for (unsigned i = 2; i < PAGE / 8; i++) {
		/* xorshift64*: never zero, incompressible */
		s ^= s >> 12;
		s ^= s << 25;
		s ^= s >> 27;
		p[i] = s * 0x2545f4914f6cdd1dull;
	}
}

static int check_page(const uint64_t *p, uint64_t index, uint64_t gen)
{
	const struct hdr *h = (const struct hdr *)p;
	uint64_t s = mix(index * 0x100000001b3ull ^ mix(gen)) | 1;
	if (h->magic != MAGIC || h->index != (uint32_t)index || h->gen != gen)
		return 0;
	for (unsigned i = 2; i < PAGE / 8; i++) {
		s ^= s >> 12;
		s ^= s << 25;
		s ^= s >> 27;
		if (p[i] != s * 0x2545f4914f6cdd1dull)
			return 0;
	}
	return 1;
}

static long parse(const char *name, const char *v, long lo, long hi)
{
	char *end;
	errno = 0;
	long n = strtol(v, &end, 10);
	if (errno || *end || n < lo || n > hi) {
		fprintf(stderr, "dirtier: %s must be an integer from %ld to %ld, got '%s'\n", name, lo, hi, v);
		exit(2);
	}
	return n;
}

int main(int argc, char **argv)
{
	long fill_pct = 80, ws_mib = 16, hb_ms = 1000;
	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc) {
			fprintf(stderr, "dirtier: %s needs a value\n", argv[i]);
			return 2;
		}
		if (!strcmp(argv[i], "--fill-pct"))
			fill_pct = parse("--fill-pct", argv[++i], 1, 95);
		else if (!strcmp(argv[i], "--ws-mib"))
			ws_mib = parse("--ws-mib", argv[++i], 0, 1 << 20);
		else if (!strcmp(argv[i], "--hb-ms"))
			hb_ms = parse("--hb-ms", argv[++i], 10, 60000);
		else {
			fprintf(stderr, "dirtier: unknown option %s (use --fill-pct, --ws-mib, --hb-ms)\n", argv[i]);
			return 2;
		}
	}
	struct sysinfo si;
	if (sysinfo(&si)) {
		perror("dirtier: sysinfo");
		return 1;
	}
	uint64_t free_bytes = (uint64_t)si.freeram * si.mem_unit;
	uint64_t pages = free_bytes / 100 * (uint64_t)fill_pct / PAGE;
	uint64_t ws_pages = (uint64_t)ws_mib * 256u;
	if (ws_pages > pages)
		ws_pages = pages;
	uint64_t *gens = calloc(pages, sizeof(uint64_t));
	uint8_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!gens || mem == MAP_FAILED) {
		fprintf(stderr, "dirtier: cannot allocate %llu pages\n", (unsigned long long)pages);
		return 1;
	}
	uint64_t start = now_ms();
	for (uint64_t i = 0; i < pages; i++)
		fill_page((uint64_t *)(mem + i * PAGE), i, 0);
	printf("DIRTIER READY pages=%llu ws_pages=%llu fill_ms=%llu\n", (unsigned long long)pages,
	       (unsigned long long)ws_pages, (unsigned long long)(now_ms() - start));
	fflush(stdout);

	/*
	 * Interleave: rewrite WS_BATCH working-set pages, verify VERIFY_BATCH
	 * pages. With the working set much smaller than RAM the rewrite loop
	 * cycles the whole set many times per verification pass.
	 */
	const uint64_t WS_BATCH = 64, VERIFY_BATCH = 64;
	uint64_t ws_next = 0, verify_next = 0, passes = 0, errors = 0, rewrites = 0, seq = 0, printed = 0;
	uint64_t next_hb = now_ms() + (uint64_t)hb_ms;
	for (;;) {
		for (uint64_t k = 0; k < WS_BATCH && ws_pages; k++) {
			uint64_t i = ws_next;
			ws_next = (ws_next + 1) % ws_pages;
			gens[i]++;
			fill_page((uint64_t *)(mem + i * PAGE), i, gens[i]);
			rewrites++;
		}
		for (uint64_t k = 0; k < VERIFY_BATCH; k++) {
			uint64_t i = verify_next;
			if (!check_page((const uint64_t *)(mem + i * PAGE), i, gens[i])) {
				const struct hdr *h = (const struct hdr *)(mem + i * PAGE);
				errors++;
				if (printed < 10) {
					printed++;
					printf("DIRTIER ERROR page=%llu gen=%llu found_magic=%#x found_index=%u found_gen=%llu\n",
					       (unsigned long long)i, (unsigned long long)gens[i], h->magic, h->index,
					       (unsigned long long)h->gen);
				}
				/* Repair so one corruption is counted once. */
				fill_page((uint64_t *)(mem + i * PAGE), i, gens[i]);
			}
			if (++verify_next == pages) {
				verify_next = 0;
				passes++;
			}
		}
		uint64_t t = now_ms();
		if (t >= next_hb) {
			printf("DIRTIER HB seq=%llu uptime_ms=%llu passes=%llu errors=%llu rewrites=%llu\n",
			       (unsigned long long)++seq, (unsigned long long)(t - start), (unsigned long long)passes,
			       (unsigned long long)errors, (unsigned long long)rewrites);
			fflush(stdout);
			next_hb = t + (uint64_t)hb_ms;
		}
	}
}
