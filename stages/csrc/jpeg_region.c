/*
 * Decode a rectangle of a JPEG with the system libjpeg-turbo.
 *
 * Why C: no Rust crate exposes libjpeg-turbo's partial decoding
 * (jpeg_crop_scanline / jpeg_skip_scanlines) against the system library
 * (the turbojpeg crate's TurboJPEG 2 API decodes whole images; its cropping
 * API needs TurboJPEG 3, which Debian 12 does not ship), and libjpeg reports
 * errors by longjmp, which must not cross Rust frames: setjmp and every
 * libjpeg call stay in this one C function.
 */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>

enum {
    CM_OK = 0,
    CM_CORRUPT = 1,     /* libjpeg error or warning: corrupt or truncated data */
    CM_UNSUPPORTED = 2, /* a color space libjpeg cannot turn into RGB (CMYK, YCCK) */
    CM_TOO_LARGE = 3,   /* over the caller's pixel limit */
    CM_BAD_REQUEST = 4, /* region outside the image or buffer too small */
};

struct cm_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char *message;
    int message_len;
};

static void cm_error_exit(j_common_ptr cinfo) {
    struct cm_error *err = (struct cm_error *)cinfo->err;
    if (err->message && err->message_len > 0) {
        (*cinfo->err->format_message)(cinfo, err->message);
    }
    longjmp(err->jump, 1);
}

/* Strict like PIL without LOAD_TRUNCATED_IMAGES: a warning (corrupt entropy
 * data, premature end of data) is an error, not a gray or garbled image. */
static void cm_emit_message(j_common_ptr cinfo, int level) {
    if (level < 0) {
        cm_error_exit(cinfo);
    }
}

/*
 * Decode rows [top, top + rows) and at least columns [left, left + cols) as
 * RGB, or with grey != 0 as one luma channel (libjpeg's grayscale output: the
 * Y of a colour JPEG, whose chroma is then never decoded). libjpeg widens the
 * columns to iMCU boundaries: the decoded columns are [*out_left, *out_left +
 * *out_cols), written row after row with a stride of *out_cols * channels bytes
 * into out (out_len bytes; image width * rows * channels always suffices). Rows below the region are never decoded; rows above
 * it are entropy-decoded and skipped (no IDCT, no color conversion).
 */
int cm_jpeg_decode_region(const unsigned char *data, unsigned long len, unsigned long long max_pixels, int left,
                          int top, int cols, int rows, int grey, unsigned char *out, unsigned long long out_len,
                          int *out_left, int *out_cols, char *message, int message_len) {
    struct jpeg_decompress_struct cinfo;
    const unsigned long long channels = grey ? 1 : 3;
    struct cm_error err;
    char buffer[JMSG_LENGTH_MAX];
    int code = CM_CORRUPT;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = cm_error_exit;
    err.pub.emit_message = cm_emit_message;
    err.message = buffer;
    err.message_len = sizeof buffer;
    buffer[0] = 0;
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        if (buffer[0]) {
            snprintf(message, message_len, "%s", buffer);
        }
        return code;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        snprintf(message, message_len, "CMYK / YCCK jpeg");
        jpeg_destroy_decompress(&cinfo);
        return CM_UNSUPPORTED;
    }
    if ((unsigned long long)cinfo.image_width * cinfo.image_height > max_pixels) {
        jpeg_destroy_decompress(&cinfo);
        return CM_TOO_LARGE;
    }
    if (left < 0 || top < 0 || cols <= 0 || rows <= 0 || (unsigned)(left + cols) > cinfo.image_width ||
        (unsigned)(top + rows) > cinfo.image_height ||
        (unsigned long long)cinfo.image_width * rows * channels > out_len) {
        snprintf(message, message_len, "region %dx%d+%d+%d outside the %ux%u image or buffer too small", cols, rows,
                 left, top, cinfo.image_width, cinfo.image_height);
        jpeg_destroy_decompress(&cinfo);
        return CM_BAD_REQUEST;
    }
    cinfo.out_color_space = grey ? JCS_GRAYSCALE : JCS_RGB;
    jpeg_start_decompress(&cinfo);
    {
        JDIMENSION x = (JDIMENSION)left, w = (JDIMENSION)cols;
        if (x != 0 || w != cinfo.output_width) {
            jpeg_crop_scanline(&cinfo, &x, &w);
        }
        *out_left = (int)x;
        *out_cols = (int)w;
    }
    if (top > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)top) != (JDIMENSION)top) {
        snprintf(message, message_len, "could not skip to row %d", top);
        jpeg_destroy_decompress(&cinfo);
        return CM_CORRUPT;
    }
    {
        unsigned long long stride = (unsigned long long)cinfo.output_width * channels;
        int row = 0;
        while (row < rows) {
            JSAMPROW line = out + (unsigned long long)row * stride;
            if (jpeg_read_scanlines(&cinfo, &line, 1) != 1) {
                snprintf(message, message_len, "scan ended at row %d", top + row);
                jpeg_destroy_decompress(&cinfo);
                return CM_CORRUPT;
            }
            row++;
        }
    }
    /* Rows below the region are not needed: abort instead of finishing. */
    jpeg_destroy_decompress(&cinfo);
    return CM_OK;
}
