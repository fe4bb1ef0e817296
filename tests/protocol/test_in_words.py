"""Exceptions in words for clients: what libraries put in their messages that means nothing
to a person is taken out."""

from __future__ import annotations

import io
import json

import av
import pytest
from PIL import Image

from protocol.errors import in_words


def test_an_object_repr_is_taken_out_of_pil_s_message() -> None:
    with pytest.raises(Exception) as caught:
        Image.open(io.BytesIO(b"not an image"))
    assert in_words(caught.value) == "cannot identify image file"


def test_ffmpeg_s_error_number_and_in_memory_file_name_are_taken_out() -> None:
    with pytest.raises(av.FFmpegError) as caught:
        av.open(io.BytesIO(b"garbage" * 10))
    assert in_words(caught.value) == "Invalid data found when processing input"


def test_a_message_in_words_is_kept_and_an_empty_one_named() -> None:
    with pytest.raises(ValueError) as caught:
        json.loads("[1,")
    assert in_words(caught.value) == str(caught.value)
    assert in_words(TimeoutError()) == "timeout error"
    assert in_words(ConnectionResetError()) == "connection reset error"
