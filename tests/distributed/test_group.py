"""``process_group_scope``: a process group created inside the block is torn down at its normal
end; one that existed before, or a block that raised, is left alone. One rank, gloo, in-process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch.distributed as dist

from lorakit.distributed.group import process_group_scope

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(60)]


def _init() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


@pytest.fixture(autouse=True)
def no_group_left() -> Iterator[None]:
    assert not dist.is_initialized()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_group_created_inside_is_destroyed() -> None:
    with process_group_scope("test"):
        _init()
    assert not dist.is_initialized()


def test_a_group_that_existed_before_is_left_to_its_owner() -> None:
    _init()
    with process_group_scope("test"):
        pass
    assert dist.is_initialized()


def test_after_an_exception_the_group_is_left() -> None:
    # tearing down could wait on a rank stuck in a collective: the failure must stay quick
    with pytest.raises(RuntimeError, match="boom"), process_group_scope("test"):
        _init()
        raise RuntimeError("boom")
    assert dist.is_initialized()


def test_no_group_no_op() -> None:
    with process_group_scope("test"):
        pass
    assert not dist.is_initialized()
