/*
 * vmapple's virtio-vsock guest test program (static aarch64, built by
 * guest/linux/build.sh). Prints "VMAPPLE-GUEST: ..." lines.
 *
 *   vmapple-vsock echo PORT              serve PORT: echo every connection (forks)
 *   vmapple-vsock send PORT BYTES N      N parallel connections to the host's PORT,
 *                                        each sending BYTES of a pattern and reading
 *                                        the echo back; prints the checksums
 *   vmapple-vsock refused PORT           connect to a host port nobody serves
 *   vmapple-vsock wait PORT              accept one connection on PORT, then exit
 *   vmapple-vsock bench PORT BYTES CONNS stream BYTES to the host's sink on PORT,
 *                                        then CONNS connect/close cycles; prints
 *                                        uptime stamps
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <linux/vm_sockets.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static int dial(unsigned port)
{
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port };
	/* The default 2 s is short for a software CPU on a busy host. */
	struct timeval tv = { .tv_sec = 60 };
	if (s >= 0)
		setsockopt(s, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof tv);
	if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
		int e = errno;
		if (s >= 0)
			close(s);
		errno = e;
		return -1;
	}
	return s;
}

/* FNV-1a over a stream. */
static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ULL;
	return h;
}

static unsigned char pattern(uint64_t i, unsigned seed)
{
	return (unsigned char)((i * 2654435761u + seed) >> 7);
}

static void echo_conn(int c)
{
	static unsigned char buf[65536];
	ssize_t n;
	while ((n = read(c, buf, sizeof buf)) > 0) {
		for (ssize_t off = 0; off < n;) {
			ssize_t w = write(c, buf + off, n - off);
			if (w <= 0)
				_exit(1);
			off += w;
		}
	}
	_exit(0);
}

static int echo(unsigned port)
{
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
	if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 64)) {
		printf("VMAPPLE-GUEST: vsock listen failed: %s\n", strerror(errno));
		return 1;
	}
	signal(SIGCHLD, SIG_IGN);
	printf("VMAPPLE-GUEST: vsock listening %u\n", port);
	fflush(stdout);
	for (;;) {
		int c = accept(s, NULL, NULL);
		if (c < 0)
			continue;
		if (fork() == 0) {
			close(s);
			echo_conn(c);
		}
		close(c);
	}
}

/* One connection: send `bytes` of pattern `seed` and read as many back. */
static int send_one(unsigned port, uint64_t bytes, unsigned seed)
{
	int s = dial(port);
	if (s < 0) {
		printf("VMAPPLE-GUEST: vsock send %u connect failed: %s\n", seed, strerror(errno));
		return 1;
	}
	static unsigned char out[65536], in[65536];
	uint64_t sent = 0, got = 0, hs = 0xcbf29ce484222325ULL, hr = hs;
	pid_t writer = fork();
	if (writer == 0) {
		while (sent < bytes) {
			size_t n = bytes - sent < sizeof out ? bytes - sent : sizeof out;
			for (size_t i = 0; i < n; i++)
				out[i] = pattern(sent + i, seed);
			ssize_t w = write(s, out, n);
			if (w <= 0)
				_exit(1);
			sent += w;
		}
		shutdown(s, SHUT_WR);
		_exit(0);
	}
	for (uint64_t i = 0; i < bytes;) {
		size_t n = bytes - i < sizeof out ? bytes - i : sizeof out;
		for (size_t j = 0; j < n; j++)
			out[j] = pattern(i + j, seed);
		hs = fnv(hs, out, n);
		i += n;
	}
	ssize_t n;
	while ((n = read(s, in, sizeof in)) > 0) {
		hr = fnv(hr, in, n);
		got += n;
	}
	int status;
	waitpid(writer, &status, 0);
	close(s);
	printf("VMAPPLE-GUEST: vsock sent %u %llu %016llx got %llu %016llx\n", seed,
	       (unsigned long long)bytes, (unsigned long long)hs, (unsigned long long)got,
	       (unsigned long long)hr);
	return got != bytes || hs != hr;
}

static int send_many(unsigned port, uint64_t bytes, int n)
{
	for (int i = 0; i < n; i++)
		if (fork() == 0)
			_exit(send_one(port, bytes, i));
	int bad = 0, status;
	for (int i = 0; i < n; i++) {
		wait(&status);
		bad += !WIFEXITED(status) || WEXITSTATUS(status) != 0;
	}
	printf("VMAPPLE-GUEST: vsock send done %d failed\n", bad);
	return bad != 0;
}

static int bench(unsigned port, uint64_t bytes, int conns)
{
	static unsigned char buf[65536];
	memset(buf, 0x5a, sizeof buf);
	int s = dial(port);
	if (s < 0)
		return 1;
	double t0 = now();
	for (uint64_t sent = 0; sent < bytes;) {
		ssize_t w = write(s, buf, bytes - sent < sizeof buf ? bytes - sent : sizeof buf);
		if (w <= 0)
			return 1;
		sent += w;
	}
	shutdown(s, SHUT_WR);
	read(s, buf, 1); /* the sink closes once it has everything */
	close(s);
	double t1 = now();
	for (int i = 0; i < conns; i++) {
		int c = dial(port);
		if (c < 0)
			return 1;
		close(c);
	}
	double t2 = now();
	printf("VMAPPLE-GUEST: vsock bench stream %.3f MiB/s connections %.1f /s\n",
	       bytes / 1048576.0 / (t1 - t0), conns / (t2 - t1));
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 3 && !strcmp(argv[1], "echo"))
		return echo(atoi(argv[2]));
	if (argc == 5 && !strcmp(argv[1], "send"))
		return send_many(atoi(argv[2]), strtoull(argv[3], NULL, 0), atoi(argv[4]));
	if (argc == 3 && !strcmp(argv[1], "refused")) {
		int s = dial(atoi(argv[2]));
		printf("VMAPPLE-GUEST: vsock refused %s\n", s < 0 ? strerror(errno) : "CONNECTED");
		return s >= 0;
	}
	if (argc == 3 && !strcmp(argv[1], "wait")) {
		int s = socket(AF_VSOCK, SOCK_STREAM, 0);
		struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = atoi(argv[2]) };
		if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1))
			return 1;
		printf("VMAPPLE-GUEST: vsock waiting\n");
		close(accept(s, NULL, NULL));
		return 0;
	}
	if (argc == 5 && !strcmp(argv[1], "bench"))
		return bench(atoi(argv[2]), strtoull(argv[3], NULL, 0), atoi(argv[4]));
	fprintf(stderr, "usage: see the comment at the top of vmapple-vsock.c\n");
	return 2;
}
