"""Frames as the real checkpoint saw them: our 1-tile pre-processing against transformers' own
``MllamaImageProcessor`` (its PIL backend, ``MllamaImageProcessorPil`` in transformers 5; the
torchvision one is not installed here) with ``max_image_tiles=1``, on real video frames."""
import numpy as np
import pytest

from mossv_ros.engine.preprocess import CLIP_MEAN, CLIP_STD, fit_size, letterbox, to_pixel_values

from .conftest import SHARED, shared_videos


def _processor(tile_px):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    return MllamaImageProcessorPil(size={'height': tile_px, 'width': tile_px}, max_image_tiles=1,
                                   image_mean=CLIP_MEAN.tolist(), image_std=CLIP_STD.tolist())


def _real_frames(per_video=3):
    import cv2
    frames = []
    for path in shared_videos():
        cap = cv2.VideoCapture(str(path))
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or 30
        for i in np.linspace(0, count - 1, per_video).astype(int):
            cap.set(cv2.CAP_PROP_POS_FRAMES, int(i))
            ok, bgr = cap.read()
            if ok:
                frames.append((f'{path.name}#{i}', cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
        cap.release()
    for path in sorted((SHARED / 'data' / 'images').glob('*.jpg')):
        frames.append((path.name, cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)))
    return frames


FRAMES = _real_frames() if SHARED.exists() else []


@pytest.mark.skipif(not FRAMES, reason='../shared/data not beside the checkout')
@pytest.mark.parametrize('tile_px', [560, 112])
def test_pixels_equal_the_mllama_processor_on_real_frames(tile_px):
    processor = _processor(tile_px)
    assert len(FRAMES) >= 6
    shapes = set()
    for name, rgb in FRAMES:
        shapes.add(rgb.shape)
        # resize + pad, before rescale and normalize: equal grey levels, pixel for pixel
        raw = processor(images=[[rgb]], do_rescale=False, do_normalize=False,
                        input_data_format='channels_last',
                        return_tensors='np')['pixel_values'][0, 0, 0]
        ours = letterbox(rgb, tile_px).transpose(2, 0, 1)
        np.testing.assert_array_equal(raw, ours, err_msg=name)
        # the whole pipeline: equal up to float32 rounding of the 1/255 rescale
        ref = processor(images=[[rgb]], input_data_format='channels_last',
                        return_tensors='np')['pixel_values'][0, 0, 0]
        np.testing.assert_allclose(to_pixel_values(rgb, tile_px), ref, rtol=0, atol=1e-6,
                                   err_msg=name)
    assert len(shapes) >= 2  # more than one frame size was checked


@pytest.mark.parametrize('shape', [(360, 640), (640, 360), (37, 51), (560, 560), (1, 900)])
def test_size_rule_and_pad_equal_the_processor(shape):
    rng = np.random.default_rng(sum(shape))
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    raw = _processor(560)(images=[[rgb]], do_rescale=False, do_normalize=False,
                          input_data_format='channels_last',
                        return_tensors='np')['pixel_values'][0, 0, 0]
    ours = letterbox(rgb, 560)
    np.testing.assert_array_equal(raw, ours.transpose(2, 0, 1))
    new_h, new_w = fit_size(*shape, 560)
    assert max(new_h, new_w) == 560  # enlarged or shrunk, the longer side fills the tile
    assert not ours[new_h:].any() and not ours[:, new_w:].any()  # zero pad bottom/right


def test_opencv_resize_would_fail_this_check():
    """The check can fail: OpenCV's bilinear resize (the old path) is off by grey levels."""
    import cv2
    rgb = np.random.default_rng(0).integers(0, 256, (360, 640, 3), dtype=np.uint8)
    new_h, new_w = fit_size(360, 640, 560)
    cv = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    assert np.abs(cv.astype(int) - letterbox(rgb, 560)[:new_h].astype(int)).max() > 1
