/*
 * vmapple's virtio-fs guest test program (static aarch64, built by
 * guest/linux/build.sh). Prints "VMAPPLE-GUEST: ..." lines the host test
 * reads.
 *
 *   vmapple-fs many DIR N      create N empty files in DIR, list DIR, print the count
 *   vmapple-fs fsync FILE      write a line to FILE, fsync it, say so
 *   vmapple-fs bench DIR         time a 512 MiB sequential write and read, 10,000
 *                              creates and 10,000 stats in DIR (scripts/bench-share.sh)
 *   vmapple-fs escape SHARE OUTSIDE
 *                              try to get out of the share mounted at SHARE
 *                              towards the host directory OUTSIDE; every
 *                              attempt must fail ("refused") or leave no
 *                              trace outside ("contained")
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

static int escapes;

static void verdict(const char *what, int ok, int err)
{
	if (ok) {
		printf("VMAPPLE-GUEST: escape %s ESCAPED\n", what);
		escapes++;
	} else {
		printf("VMAPPLE-GUEST: escape %s refused (%s)\n", what, strerror(err));
	}
}

/* An attempt that must fail: r is the call's result. */
#define MUST_FAIL(what, call)                  \
	do {                                   \
		errno = 0;                     \
		long r_ = (long)(call);        \
		verdict(what, r_ >= 0, errno); \
	} while (0)

static int many(const char *dir, int n)
{
	char path[4096];
	for (int i = 0; i < n; i++) {
		snprintf(path, sizeof path, "%s/f%05d", dir, i);
		int fd = open(path, O_CREAT | O_WRONLY | O_EXCL, 0644);
		if (fd < 0) {
			printf("VMAPPLE-GUEST: many create %s failed: %s\n", path, strerror(errno));
			return 1;
		}
		close(fd);
	}
	DIR *d = opendir(dir);
	if (!d)
		return 1;
	int count = 0;
	struct dirent *e;
	while ((e = readdir(d)))
		if (e->d_name[0] == 'f')
			count++;
	closedir(d);
	printf("VMAPPLE-GUEST: many listed %d\n", count);
	return 0;
}

static int do_fsync(const char *file)
{
	int fd = open(file, O_CREAT | O_WRONLY | O_TRUNC, 0644);
	const char line[] = "synced by the vmapple guest\n";
	if (fd < 0 || write(fd, line, sizeof line - 1) != sizeof line - 1 || fsync(fd) != 0) {
		printf("VMAPPLE-GUEST: fsync failed: %s\n", strerror(errno));
		return 1;
	}
	printf("VMAPPLE-GUEST: fsync done\n");
	fflush(stdout);
	/* The host checks the file now; stay open a moment. */
	sleep(1);
	close(fd);
	return 0;
}

static int escape(const char *share, const char *outside)
{
	char a[4096], b[4096];
	struct stat st;

	/* `..` past the mount's root lands in the guest's own tree. */
	snprintf(a, sizeof a, "%s/../../../../..%s/secret.txt", share, outside);
	MUST_FAIL("dotdot-read", open(a, O_RDONLY));
	snprintf(a, sizeof a, "%s/../../../../..%s/new.txt", share, outside);
	MUST_FAIL("dotdot-create", open(a, O_CREAT | O_WRONLY, 0644));

	/* Symlinks pointing out, absolute and relative. */
	snprintf(a, sizeof a, "%s/abs-link", share);
	snprintf(b, sizeof b, "%s/secret.txt", outside);
	symlink(b, a);
	MUST_FAIL("absolute-symlink-read", open(a, O_RDONLY));
	snprintf(a, sizeof a, "%s/abs-dir-link", share);
	symlink(outside, a);
	snprintf(a, sizeof a, "%s/abs-dir-link/new.txt", share);
	MUST_FAIL("absolute-symlink-create", open(a, O_CREAT | O_WRONLY, 0644));
	snprintf(a, sizeof a, "%s/rel-link", share);
	snprintf(b, sizeof b, "../../../../../../../..%s/secret.txt", outside);
	symlink(b, a);
	MUST_FAIL("relative-symlink-read", open(a, O_RDONLY));

	/* A directory swapped for a symlink after it was looked up. */
	snprintf(a, sizeof a, "%s/swap", share);
	mkdir(a, 0755);
	snprintf(b, sizeof b, "%s/swap/f", share);
	close(open(b, O_CREAT | O_WRONLY, 0644));
	int dfd = open(a, O_RDONLY | O_DIRECTORY);
	snprintf(b, sizeof b, "%s/swapped", share);
	rename(a, b);
	symlink(outside, a);
	MUST_FAIL("swapped-dir-create", openat(dfd, "../swap/new.txt", O_CREAT | O_WRONLY, 0644));
	snprintf(b, sizeof b, "%s/swap/secret.txt", share);
	MUST_FAIL("swapped-dir-read", open(b, O_RDONLY));
	close(dfd);

	/* Hard links and renames across the share's boundary. */
	snprintf(a, sizeof a, "%s/secret.txt", outside);
	snprintf(b, sizeof b, "%s/hardlink", share);
	MUST_FAIL("hardlink-outside", link(a, b));
	snprintf(a, sizeof a, "%s/victim", share);
	close(open(a, O_CREAT | O_WRONLY, 0644));
	MUST_FAIL("rename-out", rename(a, "/victim"));

	/* Device nodes. */
	snprintf(a, sizeof a, "%s/mem", share);
	MUST_FAIL("mknod-char", mknod(a, S_IFCHR | 0666, makedev(1, 1)));
	snprintf(a, sizeof a, "%s/sda", share);
	MUST_FAIL("mknod-block", mknod(a, S_IFBLK | 0666, makedev(8, 0)));

	/* setuid/setgid, ownership, privileged attributes. */
	snprintf(a, sizeof a, "%s/suid", share);
	close(open(a, O_CREAT | O_WRONLY, 0755));
	chmod(a, 04755 | 02000);
	MUST_FAIL("setuid-bit", (stat(a, &st) == 0 && (st.st_mode & (S_ISUID | S_ISGID))) ? 0 : (errno = EPERM, -1));
	snprintf(b, sizeof b, "%s/suid-created", share);
	close(open(b, O_CREAT | O_WRONLY, 06755));
	MUST_FAIL("setuid-create", (stat(b, &st) == 0 && (st.st_mode & (S_ISUID | S_ISGID))) ? 0 : (errno = EPERM, -1));
	MUST_FAIL("chown-away", chown(a, 4242, 4242) == 0 && stat(a, &st) == 0 && st.st_uid == 4242 ? 0 : -1);
	MUST_FAIL("security-xattr", setxattr(a, "security.capability", "\x01\x00\x00\x02", 4, 0));
	MUST_FAIL("trusted-xattr", setxattr(a, "trusted.x", "y", 1, 0));

	/* Absurd offsets and sizes. */
	int fd = open(a, O_WRONLY);
	MUST_FAIL("write-at-2^63-1", pwrite(fd, "x", 1, 0x7fffffffffffffffLL));
	close(fd);

	printf("VMAPPLE-GUEST: escape done %d\n", escapes);
	return escapes != 0;
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static void drop_caches(void)
{
	sync();
	int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
	if (fd >= 0) {
		write(fd, "3", 1);
		close(fd);
	}
}

static int bench(const char *dir)
{
	static char buf[1 << 20];
	char path[4096];
	const int mib = 512, files = 10000;
	memset(buf, 0x6b, sizeof buf);
	snprintf(path, sizeof path, "%s/bench.bin", dir);
	int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
	double t0 = now();
	for (int i = 0; i < mib; i++)
		if (fd < 0 || write(fd, buf, sizeof buf) != sizeof buf)
			return 1;
	fsync(fd);
	close(fd);
	double t1 = now();
	drop_caches();
	fd = open(path, O_RDONLY);
	double t2 = now();
	for (int i = 0; i < mib; i++)
		if (fd < 0 || read(fd, buf, sizeof buf) != sizeof buf)
			return 1;
	close(fd);
	double t3 = now();
	unlink(path);
	snprintf(path, sizeof path, "%s/bench-files", dir);
	mkdir(path, 0755);
	double t4 = now();
	for (int i = 0; i < files; i++) {
		snprintf(path, sizeof path, "%s/bench-files/f%05d", dir, i);
		int f = open(path, O_CREAT | O_WRONLY | O_EXCL, 0644);
		if (f < 0)
			return 1;
		close(f);
	}
	double t5 = now();
	drop_caches();
	struct stat st;
	double t6 = now();
	for (int i = 0; i < files; i++) {
		snprintf(path, sizeof path, "%s/bench-files/f%05d", dir, i);
		if (stat(path, &st) != 0)
			return 1;
	}
	double t7 = now();
	printf("VMAPPLE-GUEST: fsbench seq-write %.1f MiB/s seq-read %.1f MiB/s creates %.0f /s stats %.0f /s\n",
	       mib / (t1 - t0), mib / (t3 - t2), files / (t5 - t4), files / (t7 - t6));
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 4 && !strcmp(argv[1], "many"))
		return many(argv[2], atoi(argv[3]));
	if (argc == 3 && !strcmp(argv[1], "fsync"))
		return do_fsync(argv[2]);
	if (argc == 3 && !strcmp(argv[1], "bench"))
		return bench(argv[2]);
	if (argc == 4 && !strcmp(argv[1], "escape"))
		return escape(argv[2], argv[3]);
	fprintf(stderr, "usage: vmapple-fs many DIR N | fsync FILE | escape SHARE OUTSIDE\n");
	return 2;
}
