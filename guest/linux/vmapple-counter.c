/*
 * vmapple-counter LOG BLOB: the snapshot tests' process. Fills BLOB (on a
 * tmpfs) with 4 MiB of a pattern and keeps LOG (on a disk) open; then,
 * every 200 ms, appends "count N pid P" to LOG, fsyncs it, checks BLOB
 * against the pattern it keeps in memory and prints
 *   VMAPPLE-GUEST: count N pid P uptime S.mmm tmpfs ok|BAD
 * where uptime is CLOCK_BOOTTIME. A VM saved and restored mid-run must go
 * on counting in the same process, with its uptime continuing and BLOB
 * intact. Exits non-zero on any failure.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOB_SIZE (4u << 20)

static int fail(const char *what)
{
    printf("VMAPPLE-GUEST: counter %s failed\n", what);
    fflush(stdout);
    return 1;
}

static int read_all(int fd, unsigned char *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)done);
        if (n <= 0)
            return -1;
        done += (size_t)n;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: vmapple-counter LOG BLOB\n");
        return 2;
    }
    pid_t pid = getpid();
    unsigned char *want = malloc(BLOB_SIZE), *got = malloc(BLOB_SIZE);
    if (!want || !got)
        return fail("malloc");
    /* A pattern no page of zeros or of another page matches. */
    unsigned x = (unsigned)pid * 2654435761u + 1;
    for (size_t i = 0; i < BLOB_SIZE; i++) {
        x = x * 1103515245u + 12345u;
        want[i] = (unsigned char)(x >> 16);
    }
    int blob = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (blob < 0 || write(blob, want, BLOB_SIZE) != (ssize_t)BLOB_SIZE)
        return fail("blob");
    int log = open(argv[1], O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (log < 0)
        return fail("log");
    for (unsigned long n = 0;; n++) {
        char line[96];
        int len = snprintf(line, sizeof line, "count %lu pid %d\n", n, (int)pid);
        if (write(log, line, (size_t)len) != len || fsync(log) != 0)
            return fail("append");
        int ok = read_all(blob, got, BLOB_SIZE) == 0 && memcmp(got, want, BLOB_SIZE) == 0;
        struct timespec up;
        clock_gettime(CLOCK_BOOTTIME, &up);
        printf("VMAPPLE-GUEST: count %lu pid %d uptime %ld.%03ld tmpfs %s\n", n, (int)pid,
               (long)up.tv_sec, up.tv_nsec / 1000000, ok ? "ok" : "BAD");
        fflush(stdout);
        usleep(200000);
    }
}
