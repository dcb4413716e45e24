"""Python-API defects a review found, each checked against what the user sees (a hand count, the error)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnao.data import create_dataset, create_loader
from bnao.sampling import SAMPLERS, UniformSampler, create_sampler, register_sampler
from bnao.space import NAOSpace, SEARCH_SPACES, create_search_space, register_search_space
from bnao.supernet import Supernet, SupernetTrainer, evaluate_pool

SPACE = NAOSpace()


def _trainer(pool_size: int, sampler_items: int) -> SupernetTrainer:
    torch.manual_seed(0)
    model = Supernet(SPACE, layers=1, channels=4, num_classes=3, auxiliary=False)
    data = create_dataset("synthetic", num_samples=16, image_shape=(8, 8, 3), num_classes=3)
    loader = create_loader("tensor", data, 4, device="cpu", shuffle=True, drop_last=True, seed=0)
    return SupernetTrainer(model, create_sampler("uniform", sampler_items, seed=0), SPACE.sample_array(pool_size, 1),
                           loader, steps_total=10, graph="off")


def test_a_sampler_that_does_not_match_the_pool_is_refused_naming_both_sizes():
    """A sampler of 10 items over 3 archs once failed with numpy's IndexError at a draw past the pool; one of 2
    items over 3 archs silently never trained the third."""
    for pool_size, items in ((3, 10), (3, 2)):
        with pytest.raises(ValueError, match=f"draws from {items} items but the pool holds {pool_size} archs"):
            _trainer(pool_size, items).train_steps(5)
    assert _trainer(3, 3).train_steps(2)["steps"] == 2


def test_an_empty_pool_is_refused():
    trainer = _trainer(3, 3)
    with pytest.raises(ValueError, match=r"with n >= 1, got \(0, 40\)"):
        trainer.set_pool(np.zeros((0, 40), dtype=np.int64))


def test_evaluate_pool_takes_arch_strings_like_model_size():
    torch.manual_seed(0)
    model = Supernet(SPACE, layers=1, channels=4, num_classes=3, auxiliary=False)
    archs = SPACE.sample_array(2, 0)
    images, labels = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    as_strings = [" ".join(map(str, row)) for row in archs.tolist()]
    from_strings = evaluate_pool(model, as_strings, (images, labels))
    from_array = evaluate_pool(model, archs, (images, labels))
    for got, want in zip(from_strings, from_array):
        np.testing.assert_array_equal(got, want)
    assert len(from_strings[0]) == 2


def test_register_sampler_and_search_space_decorate_as_documented():
    name = "test-decorated-sampler"
    try:
        @register_sampler(name)
        class Decorated(UniformSampler):
            pass

        assert isinstance(create_sampler(name, 4, seed=0), Decorated)
    finally:
        SAMPLERS._factories.pop(name, None)
    space_name = "test-decorated-space"
    try:
        @register_search_space(space_name)
        def small_space(**kwargs):
            return NAOSpace(op_set="small", **kwargs)

        assert small_space is not None and create_search_space(space_name).op_set == "small"
    finally:
        SEARCH_SPACES._factories.pop(space_name, None)


def test_bad_values_at_the_api_edges_name_the_problem():
    from bnao.data import split_train_dev
    from bnao.search.pool import Pool
    from bnao.train import train_standalone

    with pytest.raises(ValueError, match=r"archs must have shape \[k, 40\].*got \(2, 39\)"):
        Pool.empty(SPACE).add(np.zeros((2, 39), dtype=np.int64), [1, 2], 0)
    data = create_dataset("synthetic", num_samples=20, image_shape=(8, 8, 3), num_classes=3)
    with pytest.raises(ValueError, match=r"dev_fraction must be in \(0, 1\), got nan"):
        split_train_dev(data, dev_fraction=float("nan"))
    with pytest.raises(ValueError, match="only the uniform sampler takes a pool size"):
        create_sampler("proportional", 5)
    with pytest.raises(ValueError, match="num_classes=2 but the training data has 3 classes"):
        train_standalone(SPACE.sample_array(1, 0)[0], SPACE, data, num_classes=2, epochs=1, layers=1, channels=4,
                         batch_size=4, device="cpu", progress=False)


def test_training_on_images_too_small_for_the_network_is_refused_up_front():
    from bnao.train import train_standalone

    tiny = create_dataset("synthetic", num_samples=8, image_shape=(2, 2, 3), num_classes=3)
    with pytest.raises(ValueError, match=r"image size 2x2 is too small for the cifar skeleton: its network cannot "
                                         r"run on images smaller than 3x3"):
        train_standalone(SPACE.sample_array(1, 0)[0], SPACE, tiny, epochs=1, layers=1, channels=4, batch_size=4,
                         device="cpu", progress=False)
