/*
 * fbwrite SRC: copies SRC into /dev/fb0 through a shared mapping, the way
 * a graphical program draws. Linux's DRM fbdev emulation sends the
 * display device only what it sees written through the mapping (its
 * deferred I/O tracks the pages), so a plain write() is not enough here.
 * Prints the geometry it drew; exits non-zero on any failure.
 */
#include <fcntl.h>
#include <linux/fb.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct fb_fix_screeninfo fix;
    struct fb_var_screeninfo var;
    int fb, src;
    size_t len, done = 0;
    unsigned char *map;

    if (argc != 2) {
        fprintf(stderr, "usage: fbwrite SRC\n");
        return 2;
    }
    fb = open("/dev/fb0", O_RDWR);
    src = open(argv[1], O_RDONLY);
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
