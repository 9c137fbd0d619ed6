/* Region decode of a JPEG through the libjpeg API of libjpeg-turbo: only the rows and iMCU columns a crop needs.
 *
 * Built on first use by data_tools/jpeg_region.py (cc -O2 -shared -fPIC ... -ljpeg) and called through ctypes.
 * libjpeg reports errors by longjmp from its error handler, which ctypes cannot catch, so the setjmp lives here and
 * every failure comes back as a return code with a message.
 *
 * The decode is the one torchvision.io.decode_jpeg and Pillow run (islow IDCT, fancy upsampling, RGB out), at
 * 1/scale_denom scale, with jpeg_crop_scanline (columns: the left edge moves down to an iMCU boundary) and
 * jpeg_skip_scanlines (rows above the region) doing less of it. The rows below the region are never decoded.
 */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

/* Return codes (data_tools/jpeg_region.py names them). */
#define JR_OK 0
#define JR_ERROR 1       /* libjpeg refused the data; message in msg */
#define JR_COLOR 2       /* CMYK / YCCK / other colour spaces: left to the full decoder */
#define JR_SAMPLING 3    /* sampling factors other than 4:4:4, 4:2:2, 4:2:0, 4:4:0 and grey */
#define JR_SIZE 4        /* the header's size or scale is not what the caller expected */
#define JR_REGION 5      /* the box is out of the image */

#define JR_MARGIN 2 /* columns decoded beyond the box on each side: see jr_decode */

struct jr_error {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
};

static void jr_error_exit(j_common_ptr cinfo) {
  struct jr_error *err = (struct jr_error *)cinfo->err;
  longjmp(err->jump, 1);
}

/* Warnings (corrupt data that libjpeg decodes on) pass silently, as with torchvision's decoder. */
static void jr_emit_message(j_common_ptr cinfo, int msg_level) {
  (void)cinfo;
  (void)msg_level;
}

/* A source that fails at the end of the data, as torchvision's does: a truncated file is an error, not grey rows. */
static void jr_init_source(j_decompress_ptr cinfo) { (void)cinfo; }
static boolean jr_fill_input_buffer(j_decompress_ptr cinfo) {
  ERREXIT(cinfo, JERR_INPUT_EOF);
  return FALSE;
}
static void jr_skip_input_data(j_decompress_ptr cinfo, long num_bytes) {
  struct jpeg_source_mgr *src = cinfo->src;
  if (num_bytes <= 0) return;
  if ((size_t)num_bytes > src->bytes_in_buffer) ERREXIT(cinfo, JERR_INPUT_EOF);
  src->next_input_byte += num_bytes;
  src->bytes_in_buffer -= (size_t)num_bytes;
}
static void jr_term_source(j_decompress_ptr cinfo) { (void)cinfo; }

/* Luma 1x1 (4:4:4), 2x1 (4:2:2), 2x2 (4:2:0) or 1x2 (4:4:0) over 1x1 chroma, or one grey component: the layouts
 * the tests cover. */
static int jr_sampling_ok(j_decompress_ptr cinfo) {
  if (cinfo->num_components == 1) return 1;
  if (cinfo->num_components != 3) return 0;
  jpeg_component_info *c = cinfo->comp_info;
  if (c[1].h_samp_factor != 1 || c[1].v_samp_factor != 1 || c[2].h_samp_factor != 1 || c[2].v_samp_factor != 1)
    return 0;
  return c[0].h_samp_factor <= 2 && c[0].v_samp_factor <= 2;
}

/* The checks between the header and the decode: colour space, sampling, size, box. */
static int jr_check(j_decompress_ptr cinfo, int width, int height, int top, int left, int h, int w) {
  J_COLOR_SPACE cs = cinfo->jpeg_color_space;
  if (cs != JCS_YCbCr && cs != JCS_GRAYSCALE && cs != JCS_RGB) return JR_COLOR;
  if (!jr_sampling_ok(cinfo)) return JR_SAMPLING;
  if ((int)cinfo->output_width != width || (int)cinfo->output_height != height) return JR_SIZE;
  if (top < 0 || left < 0 || h <= 0 || w <= 0 || top + h > height || left + w > width) return JR_REGION;
  return JR_OK;
}

/* Decode the box (top, left, h, w) of the image at 1/scale_denom scale to RGB in `out`: h * out_cols * 3 bytes,
 * out_cols >= w + 2 * JR_MARGIN + 15 (the columns decoded); on return its first h * w * 3 bytes hold the box, rows
 * packed. width and height are the scaled image's size the caller computed (ceil(full / scale_denom)); a header
 * that disagrees is refused (JR_SIZE).
 *
 * Rows: jpeg_skip_scanlines passes over the rows above the box (entropy decoding only) and the rows below are never
 * read; the image keeps its height, so the upsampler's context rows are the full decode's. Columns:
 * jpeg_crop_scanline decodes [x0, x1) with x0 moved down to an iMCU boundary, and truncates each component to that
 * width, so the fancy upsampler treats x0 and x1 as image edges. The box is widened by JR_MARGIN columns on each
 * side (one chroma sample of 4:2:x) before that, so its own columns see the full decode's neighbours.
 * Returns JR_OK or a code above, with a one-line message in msg for JR_ERROR. */
int jr_decode(const unsigned char *data, unsigned long size, int scale_denom, int width, int height, int top,
              int left, int h, int w, unsigned char *out, int out_cols, char *msg, int msg_len) {
  struct jpeg_decompress_struct cinfo;
  struct jr_error err;
  struct jpeg_source_mgr src;
  int code;

  memset(&cinfo, 0, sizeof(cinfo));
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = jr_error_exit;
  err.pub.emit_message = jr_emit_message;
  if (setjmp(err.jump)) {
    char text[JMSG_LENGTH_MAX];
    (*cinfo.err->format_message)((j_common_ptr)&cinfo, text);
    snprintf(msg, (size_t)msg_len, "%s", text);
    jpeg_destroy_decompress(&cinfo);
    return JR_ERROR;
  }
  jpeg_create_decompress(&cinfo);
  src.next_input_byte = data;
  src.bytes_in_buffer = size;
  src.init_source = jr_init_source;
  src.fill_input_buffer = jr_fill_input_buffer;
  src.skip_input_data = jr_skip_input_data;
  src.resync_to_restart = jpeg_resync_to_restart;
  src.term_source = jr_term_source;
  cinfo.src = &src;

  jpeg_read_header(&cinfo, TRUE);
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = 1;
  cinfo.scale_denom = (unsigned int)scale_denom;
  jpeg_calc_output_dimensions(&cinfo);
  code = jr_check(&cinfo, width, height, top, left, h, w);
  if (code != JR_OK) {
    jpeg_destroy_decompress(&cinfo);
    return code;
  }

  jpeg_start_decompress(&cinfo);
  JDIMENSION x0 = (JDIMENSION)(left > JR_MARGIN ? left - JR_MARGIN : 0);
  JDIMENSION x1 = (JDIMENSION)(left + w + JR_MARGIN < width ? left + w + JR_MARGIN : width);
  JDIMENSION cols = x1 - x0;
  if (cols < cinfo.output_width) jpeg_crop_scanline(&cinfo, &x0, &cols); /* x0 down to an iMCU boundary */
  if ((int)cols > out_cols) ERREXIT1(&cinfo, JERR_WIDTH_OVERFLOW, cols);
  if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
  /* Rows go straight into `out` at the decoded width (a separate row buffer, reused, made the whole decode 40%
   * slower here), then are packed to the box's width in place: each row moves to a lower address. */
  size_t stride = (size_t)cols * 3, row = (size_t)w * 3, skip = (size_t)(left - (int)x0) * 3;
  for (int r = 0; r < h; r++) {
    JSAMPROW dst = out + (size_t)r * stride;
    if (jpeg_read_scanlines(&cinfo, &dst, 1) != 1) ERREXIT(&cinfo, JERR_INPUT_EOF); /* no suspension here */
  }
  if (stride != row)
    for (int r = 0; r < h; r++) memmove(out + (size_t)r * row, out + (size_t)r * stride + skip, row);
  jpeg_abort_decompress(&cinfo); /* the rows below are not needed */
  jpeg_destroy_decompress(&cinfo);
  return JR_OK;
}
