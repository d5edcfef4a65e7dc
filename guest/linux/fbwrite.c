/*
 * fbwrite SRC: copies SRC into /dev/fb0 through a shared mapping, the way
 * a graphical program draws.
 * fbwrite --bench full|small SECONDS: for the display benchmark, redraws
 * the whole screen (full) or moves a 64x64 square (small) as fast as it
 * can for SECONDS. Linux's DRM fbdev emulation sends the
 * display device only what it sees written through the mapping (its
 * deferred I/O tracks the pages), so a plain write() is not enough here.
 * Prints the geometry it drew; exits non-zero on any failure.
 */
#include <fcntl.h>
#include <linux/fb.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static int bench(unsigned char *map, struct fb_var_screeninfo *var,
                 unsigned line, int full, int seconds)
{
    time_t end = time(NULL) + seconds;
    unsigned frame = 0;
    while (time(NULL) < end) {
        frame++;
        if (full) {
            for (unsigned y = 0; y < var->yres; y++) {
                unsigned *row = (unsigned *)(map + (size_t)y * line);
                for (unsigned x = 0; x < var->xres; x++)
                    row[x] = (x + y + frame) * 0x010203u;
            }
        } else {
            unsigned ox = (frame * 64) % (var->xres - 64);
            unsigned oy = (frame * 16) % (var->yres - 64);
            for (unsigned y = 0; y < 64; y++) {
                unsigned *row = (unsigned *)(map + (size_t)(oy + y) * line) + ox;
                for (unsigned x = 0; x < 64; x++)
                    row[x] = frame * 0x00102030u + x;
            }
            usleep(5000);
        }
    }
    printf("fbwrite: bench drew %u frames\n", frame);
    return 0;
}

int main(int argc, char **argv)
{
    struct fb_fix_screeninfo fix;
    struct fb_var_screeninfo var;
    int fb, src;
    size_t len, done = 0;
    unsigned char *map;

    int is_bench = argc == 4 && strcmp(argv[1], "--bench") == 0;
    if (argc != 2 && !is_bench) {
        fprintf(stderr, "usage: fbwrite SRC | fbwrite --bench full|small SECONDS\n");
        return 2;
    }
    fb = open("/dev/fb0", O_RDWR);
    src = is_bench ? 0 : open(argv[1], O_RDONLY);
    if (fb < 0 || src < 0 || ioctl(fb, FBIOGET_FSCREENINFO, &fix) < 0 ||
        ioctl(fb, FBIOGET_VSCREENINFO, &var) < 0) {
        perror("fbwrite: open");
        return 1;
    }
    len = (size_t)fix.line_length * var.yres;
    map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fb, 0);
    if (map == MAP_FAILED) {
        perror("fbwrite: mmap");
        return 1;
    }
    if (is_bench)
        return bench(map, &var, fix.line_length, strcmp(argv[2], "full") == 0, atoi(argv[3]));
    while (done < len) {
        ssize_t n = read(src, map + done, len - done);
        if (n <= 0) {
            fprintf(stderr, "fbwrite: %s ends after %zu of %zu bytes\n", argv[1], done, len);
            return 1;
        }
        done += (size_t)n;
    }
    if (msync(map, len, MS_SYNC) < 0) {
        perror("fbwrite: msync");
        return 1;
    }
    printf("fbwrite: %u x %u, %u bytes a line\n", var.xres, var.yres, fix.line_length);
    return 0;
}
