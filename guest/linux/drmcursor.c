/*
 * drmcursor N: gives CRTC N of /dev/dri/card0 (virtio-gpu: scanout N) a
 * 64x64 cursor through the legacy cursor ioctl (DRM_IOCTL_MODE_CURSOR2, as an X server's hardware
 * cursor does), so virtio-gpu sends UPDATE_CURSOR with it. The image is
 * the display test's (crates/vmapple/tests/display.rs, cursor_pixel):
 * pixel (x, y) is 0xAARRGGBB with alpha 0 where (x + y) % 3 == 0, else
 * 0xff, red 4x, green 4y, blue 0xa0 ^ x; hot spot (5, 7).
 *
 * The cursor lasts while the file stays open (closing it hands the
 * display back to the console, which hides the cursor), so once it is
 * set a child keeps the file open and the program exits 0. Non-zero on
 * any failure.
 */
#include <drm/drm.h>
#include <drm/drm_mode.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define SIDE 64
#define MAX_CRTCS 8

static uint32_t cursor_pixel(unsigned x, unsigned y)
{
    uint32_t alpha = (x + y) % 3 == 0 ? 0 : 0xff;
    return alpha << 24 | (x * 4) << 16 | (y * 4) << 8 | (0xa0 ^ x);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: drmcursor CRTC-INDEX\n");
        return 2;
    }
    unsigned want = (unsigned)atoi(argv[1]);
    int fd = open("/dev/dri/card0", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        perror("drmcursor: /dev/dri/card0");
        return 1;
    }
    struct drm_mode_card_res res = {0};
    if (ioctl(fd, DRM_IOCTL_MODE_GETRESOURCES, &res) < 0) {
        perror("drmcursor: GETRESOURCES");
        return 1;
    }
    uint32_t crtcs[MAX_CRTCS];
    struct drm_mode_card_res ids = {0};
    ids.count_crtcs = res.count_crtcs < MAX_CRTCS ? res.count_crtcs : MAX_CRTCS;
    ids.crtc_id_ptr = (uintptr_t)crtcs;
    if (ioctl(fd, DRM_IOCTL_MODE_GETRESOURCES, &ids) < 0) {
        perror("drmcursor: GETRESOURCES ids");
        return 1;
    }
    unsigned n = res.count_crtcs < MAX_CRTCS ? res.count_crtcs : MAX_CRTCS;
    if (want >= n) {
        fprintf(stderr, "drmcursor: no CRTC %u (%u)\n", want, n);
        return 1;
    }

    struct drm_mode_create_dumb bo = {.width = SIDE, .height = SIDE, .bpp = 32};
    if (ioctl(fd, DRM_IOCTL_MODE_CREATE_DUMB, &bo) < 0) {
        perror("drmcursor: CREATE_DUMB");
        return 1;
    }
    struct drm_mode_map_dumb map = {.handle = bo.handle};
    if (ioctl(fd, DRM_IOCTL_MODE_MAP_DUMB, &map) < 0) {
        perror("drmcursor: MAP_DUMB");
        return 1;
    }
    unsigned char *px = mmap(NULL, bo.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, map.offset);
    if (px == MAP_FAILED) {
        perror("drmcursor: mmap");
        return 1;
    }
    for (unsigned y = 0; y < SIDE; y++)
        for (unsigned x = 0; x < SIDE; x++)
            ((uint32_t *)(px + (size_t)y * bo.pitch))[x] = cursor_pixel(x, y);

    {
        struct drm_mode_cursor2 c = {
            .flags = DRM_MODE_CURSOR_BO | DRM_MODE_CURSOR_MOVE,
            .crtc_id = crtcs[want],
            .x = 100,
            .y = 100,
            .width = SIDE,
            .height = SIDE,
            .handle = bo.handle,
            .hot_x = 5,
            .hot_y = 7,
        };
        if (ioctl(fd, DRM_IOCTL_MODE_CURSOR2, &c) < 0) {
            perror("drmcursor: CURSOR2");
            return 1;
        }
    }
    printf("drmcursor: cursor on CRTC %u of %u\n", want, n);
    fflush(stdout);
    pid_t child = fork();
    if (child < 0) {
        perror("drmcursor: fork");
        return 1;
    }
    if (child == 0) {
        for (;;)
            pause();
    }
    return 0;
}
