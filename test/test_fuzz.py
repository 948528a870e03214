"""Hypothesis fuzz of the input layers (issue 6): image conversion and prompt handling.

Thousands of generated messages: no exception other than a classified ImageError escapes the
converters, every rejection has a reason, every accepted image is uint8 RGB of the message's
size; prompts are accepted cleaned or rejected with a reason, never raise.
"""
import cv2
from hypothesis import given, HealthCheck, settings
from hypothesis import strategies as st
import numpy as np
import pytest

from mossv_ros.engine.policy import validate_prompt

sensor_msgs = pytest.importorskip('sensor_msgs.msg')
from mossv_ros.ros import convert  # noqa: E402 - needs the ROS wheels

KINDS = {'convert', 'decode', 'empty', 'encoding', 'size', 'too_large'}
ENCODINGS = list(convert.SUPPORTED_ENCODINGS) + list(convert.DEPTH_ENCODINGS) + [
    '', 'jpeg', 'RGB8', 'nv12', 'bayer_xyz8', 'rgb8\x00', 'ü']
BYTES_PER_PIXEL = {'mono8': 1, '8UC1': 1, 'mono16': 2, 'rgb8': 3, 'bgr8': 3, '8UC3': 3,
                   'rgba8': 4, 'bgra8': 4, 'rgb16': 6, 'bgr16': 6, 'rgba16': 8, 'bgra16': 8,
                   'yuv422': 2, 'yuv422_yuy2': 2, '32FC1': 4, '16UC1': 2}
FUZZ = settings(max_examples=2000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def images(draw):
    encoding = draw(st.sampled_from(ENCODINGS))
    width = draw(st.integers(0, 48))
    height = draw(st.integers(0, 48))
    bpp = BYTES_PER_PIXEL.get(encoding, 2 if encoding.endswith('16') else 1)
    step = draw(st.one_of(st.just(width * bpp), st.integers(0, 300)))
    size = draw(st.one_of(st.just(step * height), st.integers(0, 5000)))
    fill = draw(st.sampled_from(['random', 'nan', 'zeros']))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if fill == 'nan' and size >= 4:
        data = np.full(size // 4, np.nan, np.float32).tobytes() + b'\0' * (size % 4)
    elif fill == 'zeros':
        data = bytes(size)
    else:
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    msg = sensor_msgs.Image(height=height, width=width, encoding=encoding, step=step,
                            is_bigendian=draw(st.integers(0, 1)))
    msg.data = data
    return msg


@FUZZ
@given(images())
def test_image_conversion_never_escapes(msg):
    try:
        rgb = convert.image_to_rgb(msg)
    except convert.ImageError as exc:
        assert exc.kind in KINDS and str(exc)
        return
    assert rgb.dtype == np.uint8 and rgb.shape == (msg.height, msg.width, 3)
    assert rgb.flags['C_CONTIGUOUS']


def _encoded(kind):
    img = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    return cv2.imencode('.jpg' if kind == 'jpeg' else '.png', img)[1].tobytes()


VALID = {k: _encoded(k) for k in ('jpeg', 'png')}


@st.composite
def compressed(draw):
    kind = draw(st.sampled_from(['jpeg', 'png', 'random']))
    if kind == 'random':
        data = draw(st.binary(max_size=2000))
    else:
        data = bytearray(VALID[kind])
        cut = draw(st.integers(0, len(data)))
        data = data[:cut]  # truncated
        for pos in draw(st.lists(st.integers(0, max(0, len(data) - 1)), max_size=8)):
            if data:
                data[pos] = draw(st.integers(0, 255))  # corrupted
        data = bytes(data)
    msg = sensor_msgs.CompressedImage(format=draw(st.sampled_from(['jpeg', 'png', '', 'x'])))
    msg.data = data
    return msg


@FUZZ
@given(compressed())
def test_compressed_conversion_never_escapes(msg):
    try:
        rgb = convert.compressed_to_rgb(msg)
    except convert.ImageError as exc:
        assert exc.kind in KINDS and str(exc)
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


@pytest.mark.parametrize('encoding', ['bayer_rggb8', 'bayer_grbg16', 'yuv422', 'yuv422_yuy2',
                                      'mono16', 'bgra8', 'rgb16'])
def test_convertible_encodings_convert(encoding):
    bpp = BYTES_PER_PIXEL.get(encoding, 2 if encoding.endswith('16') else 1)
    msg = sensor_msgs.Image(height=8, width=12, encoding=encoding, step=12 * bpp)
    msg.data = np.arange(8 * 12 * bpp, dtype=np.uint8).tobytes()
    rgb = convert.image_to_rgb(msg)
    assert rgb.shape == (8, 12, 3) and rgb.dtype == np.uint8


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'mono8', 'mono16', 'rgb16',
                                      'bayer_rggb8', 'bayer_grbg16', 'yuv422'])
@pytest.mark.parametrize('pad', [1, 2, 5, 64])
def test_padded_rows_read_as_packed_ones(encoding, pad):
    """Aligned rows (step > width x bytes per pixel, as camera drivers publish them) give the
    image the packed rows give: each row is read from its own step offset (cv_bridge's rule).
    Before this, rows after the first were shifted by the padding (issue 26 item 1)."""
    bpp = BYTES_PER_PIXEL.get(encoding, 2 if encoding.endswith('16') else 1)
    height, width = 6, 10
    rng = np.random.default_rng(pad)
    packed = rng.integers(0, 256, (height, width * bpp), dtype=np.uint8)
    padded = np.concatenate([packed, np.full((height, pad), 0xAB, np.uint8)], axis=1)
    want = convert.image_to_rgb(sensor_msgs.Image(
        height=height, width=width, encoding=encoding, step=width * bpp,
        data=packed.tobytes()))
    got = convert.image_to_rgb(sensor_msgs.Image(
        height=height, width=width, encoding=encoding, step=width * bpp + pad,
        data=padded.tobytes()))
    np.testing.assert_array_equal(got, want)


def test_a_2x3_rgb8_image_with_a_2_byte_pad():
    """The example of issue 26: row 2 must read [10 13 16], not [99 11 14]."""
    rows = [[1, 4, 7, 2, 5, 8, 3, 6, 9, 99, 99], [10, 13, 16, 11, 14, 17, 12, 15, 18, 99, 99]]
    msg = sensor_msgs.Image(height=2, width=3, encoding='rgb8', step=11,
                            data=bytes(sum(rows, [])))
    rgb = convert.image_to_rgb(msg)
    assert rgb[1, 0].tolist() == [10, 13, 16] and rgb[0, 2].tolist() == [3, 6, 9]


def test_a_step_shorter_than_a_row_is_refused():
    msg = sensor_msgs.Image(height=2, width=4, encoding='rgb8', step=10, data=bytes(20))
    with pytest.raises(convert.ImageError, match='shorter than a row') as info:
        convert.image_to_rgb(msg)
    assert info.value.kind == 'size'


@pytest.mark.parametrize('encoding', ['32FC1', '16UC1', 'nv12', 'jpeg'])
def test_unconvertible_encodings_are_rejected_with_a_reason(encoding):
    msg = sensor_msgs.Image(height=4, width=4, encoding=encoding, step=16)
    msg.data = bytes(64)
    with pytest.raises(convert.ImageError, match='depth|unsupported') as info:
        convert.image_to_rgb(msg)
    assert info.value.kind == 'encoding'


def test_8k_image_is_accepted_and_a_larger_one_rejected_before_decoding():
    msg = sensor_msgs.Image(height=4320, width=7680, encoding='rgb8', step=7680 * 3)
    msg.data = bytes(4320 * 7680 * 3)
    assert convert.image_to_rgb(msg).shape == (4320, 7680, 3)
    msg = sensor_msgs.Image(height=9000, width=9000, encoding='rgb8', step=27000)
    with pytest.raises(convert.ImageError) as info:
        convert.image_to_rgb(msg)
    assert info.value.kind == 'too_large'


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.text(max_size=3000), st.binary(max_size=50), st.integers(), st.none()))
def test_prompt_validation_never_raises(text):
    ok, cleaned, reason = validate_prompt(text, 2000)
    assert reason
    if ok:
        assert cleaned and cleaned == cleaned.strip() and len(cleaned) <= 2000
        assert all(ch in '\n\t' or (ord(ch) >= 32 and ord(ch) != 127) for ch in cleaned)
    else:
        assert cleaned == ''


def _png_bomb(side: int) -> bytes:
    """A real PNG of ``side`` x ``side`` grey pixels, all zero: a few MB that decode to
    ``side``^2 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack('>I', len(body)) + kind + body
                + struct.pack('>I', zlib.crc32(kind + body) & 0xffffffff))
    packer = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + pixels
    body = b''.join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack('>IIBBBBB', side, side, 8, 0, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', body)
            + chunk(b'IEND', b''))


def _jpeg_bomb(side: int) -> bytes:
    """A JPEG whose frame header says ``side`` x ``side``, from a real small JPEG."""
    import cv2
    ok, small = cv2.imencode('.jpg', np.zeros((8, 8, 3), np.uint8))
    data = bytearray(small.tobytes())
    sof = data.find(b'\xff\xc0')
    data[sof + 5:sof + 9] = side.to_bytes(2, 'big') * 2  # height, width
    return bytes(data)


@pytest.mark.parametrize('bomb', ['png', 'jpeg'])
def test_a_decompression_bomb_is_refused_from_its_header(bomb):
    """Issue 36 item 1: a 30000 x 30000 PNG (a few MB on the wire, 900 MB decoded) and a
    JPEG claiming 60000 x 60000 are refused before decoding, with the reason, and memory
    barely moves; the next normal image converts."""
    import psutil
    data = _png_bomb(30000) if bomb == 'png' else _jpeg_bomb(60000)
    msg = sensor_msgs.CompressedImage(format=bomb)
    msg.data = data
    before = psutil.Process().memory_info().rss
    with pytest.raises(convert.ImageError) as caught:
        convert.compressed_to_rgb(msg)
    grown = psutil.Process().memory_info().rss - before
    assert caught.value.kind == 'too_large' and 'not decoded' in str(caught.value)
    assert grown < 50 << 20, grown
    import cv2
    normal = sensor_msgs.CompressedImage(format='jpeg')
    normal.data = cv2.imencode('.jpg', np.full((48, 64, 3), 90, np.uint8))[1].tobytes()
    assert convert.compressed_to_rgb(normal).shape == (48, 64, 3)


def test_an_oversized_compressed_payload_is_refused_unread():
    msg = sensor_msgs.CompressedImage(format='png')
    msg.data = bytes(convert.MAX_COMPRESSED_BYTES + 1)
    with pytest.raises(convert.ImageError, match='compressed payload of'):
        convert.compressed_to_rgb(msg)


def test_8uc1_is_read_as_grey():
    """Issue 36 item 6: ``8UC1`` was listed as supported and always refused."""
    msg = sensor_msgs.Image(height=2, width=3, encoding='8UC1', step=3)
    msg.data = bytes([0, 10, 20, 30, 40, 250])
    rgb = convert.image_to_rgb(msg)
    assert rgb.shape == (2, 3, 3)
    assert rgb[:, :, 0].ravel().tolist() == [0, 10, 20, 30, 40, 250]
    assert (rgb[:, :, 0] == rgb[:, :, 2]).all()
