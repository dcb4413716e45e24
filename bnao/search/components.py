"""What a search run is made of: its data, supernet, pool, sampler, trainer and controller.

:class:`SearchComponents` is a part of :class:`~bnao.search.loop.BalancedNAO` (its config, device and
processes), kept apart so that the loop module holds the search phases of Algorithm 1. The parts are built
in one fixed order because several of them draw from torch's global generator (seeded first): the
same config therefore gives the same supernet weights, pool and search in any process.
"""

from __future__ import annotations

import numpy as np
import torch

from ..controller import NAOController
from ..controller.steps import graph_blocker
from ..data import AugmentConfig, create_dataset, create_loader, split_train_dev
from ..data_parallel import GradientSync, ShardedLoader
from ..sampling import create_sampler
from ..size import image_side, model_size
from ..space import create_search_space
from ..supernet import RandomBatches, Supernet, SupernetTrainer
from .budget import Budget
from .config import ConfigError
from .pool import Pool, read_pool_file


class SearchComponents:
    """Builds the data, supernet, pool, sampler, trainer and controller of a search."""

    def _build(self) -> None:
        """Builds every part of the run, in the order its random draws have always been made."""
        c = self.config
        seed = int(c["seed"])
        # Weight initialisation draws from torch's global generator: seed it so
        # that the same config gives the same search in any process.
        torch.manual_seed(seed)
        self.space = create_search_space(c["space"]["name"], op_set=c["space"]["op_set"], num_nodes=c["space"]["num_nodes"])
        full = self._build_data(seed)
        # The size budget (on the final network): refused here, before any training, when no arch can meet it.
        self.budget = Budget.from_config(c, self.space, self.num_classes, self.in_channels,
                                         image_side(full, c["supernet"]["skeleton"]))
        self.budget.check_feasible()
        self._build_loaders(seed)
        self._build_supernet()
        self._build_pool(seed)
        self._build_learners(seed)

    def _build_data(self, seed: int):
        """Reads the dataset and splits it into the train and dev parts.

        Args:
            seed: The run's seed (synthetic data and the train/dev split).

        Returns:
            The whole (possibly limited) training dataset, before the split.
        """
        data = self.config["data"]
        options = {}
        if data["dataset"] == "synthetic":
            side, channels = int(data["synthetic_size"]), int(data["synthetic_channels"])
            options = dict(num_samples=int(data["synthetic_samples"]), image_shape=(side, side, channels),
                           num_classes=int(data["synthetic_classes"]), seed=seed)
        full = create_dataset(data["dataset"], root=data["root"], split="train", **options)
        if data["train_limit"]:
            full = full.subset(np.arange(min(int(data["train_limit"]), len(full))), full.name)
        self.train_set, self.dev_set = split_train_dev(full, dev_fraction=data["dev_fraction"], seed=seed)
        self.num_classes = int(full.num_classes)
        self.in_channels = int(full.images.shape[-1]) if hasattr(full, "images") else 3
        self._check_batches_fit()
        return full

    def _check_batches_fit(self) -> None:
        """Refuses batch sizes that the training split cannot fill, now rather than when their phase starts.

        Both the supernet and the re-rank train on the training split with ``drop_last``: a batch size above
        its image count makes no batch at all.

        Raises:
            ConfigError: Naming the key, its value and the image count.
        """
        images = len(self.train_set)
        for key in ("supernet.batch_size", "final.batch_size"):
            section, leaf = key.split(".")
            size = int(self.config[section][leaf])
            if size > images:
                raise ConfigError(
                    f"config key {key!r} is {size}, but the search trains on {images} training images "
                    f"({self.config['data']['dataset']} after data.train_limit and data.dev_fraction): no full "
                    f"batch fits; set {key} to at most {images} or use more images")

    def _build_loaders(self, seed: int) -> None:
        """The supernet's training loader (sharded over the processes), its dev batches and its step counts.

        Args:
            seed: The run's seed (the loaders' shuffling and augmentation).
        """
        data, sn = self.config["data"], self.config["supernet"]
        self.train_loader = create_loader(
            data["loader"], self.train_set, sn["batch_size"], device=self.device,
            augment=AugmentConfig(cutout=data["cutout"]), shuffle=True, drop_last=True, seed=seed,
            channels_last=sn["channels_last"],
        )
        if self.parallel.enabled:
            self.train_loader = ShardedLoader(self.train_loader, self.parallel, "supernet.batch_size")
        self.dev_batches = self._dev_batches(seed)
        self.steps_per_epoch = int(sn["steps_per_epoch"] or len(self.train_loader))
        self.steps_per_iteration = int(sn["epochs"]) * self.steps_per_epoch

    def _build_supernet(self) -> None:
        """The supernet, on this process's device, drawing its weights from torch's global generator."""
        sn = self.config["supernet"]
        self.model = Supernet(
            self.space, skeleton=sn["skeleton"], layers=sn["layers"], channels=sn["channels"], num_classes=self.num_classes,
            in_channels=self.in_channels, drop_path_keep_prob=sn["drop_path_keep_prob"],
            total_steps=self.steps_per_iteration, drop_path_identity=sn["drop_path_identity"],
            kernels=sn["kernels"],
        ).to(self.device)
        self.model.batch_shard = (self.parallel.rank, self.parallel.world_size)

    def _build_pool(self, seed: int) -> None:
        """The first pool: random (seeded, inside the budget when there is one) or read from a file.

        Args:
            seed: The run's seed (the random pool).
        """
        sc = self.config["search"]
        self.pool = Pool.empty(self.space)
        if sc["pool_file"]:
            archs, problems = read_pool_file(sc["pool_file"], self.space, skip_invalid=sc["skip_invalid"])
            for p in problems:
                self.echo(f"skipped invalid arch: {p}")
            archs, note = self.budget.restrict(archs, "search.pool_file")
            if note:
                self.echo(note)
        elif self.budget.active:
            archs = self.budget.draw(int(sc["pool_size"]), np.random.default_rng(seed))
        else:
            archs = self.space.sample_array(int(sc["pool_size"]), rng=np.random.default_rng(seed))
        if self.budget.active:
            self.echo(self.budget.summary())
        self.pool.add(archs, self._sizes(archs), iteration=0)
        self.state["eval_indices"] = np.arange(len(self.pool))

    def _build_learners(self, seed: int) -> None:
        """The size-proportional sampler, the supernet trainer and the NAO controller.

        Args:
            seed: The run's seed (the sampler's draws, the trainer's and the controller's generators).
        """
        c = self.config
        sn = c["supernet"]
        sp = c["sampler"]
        self.sampler = create_sampler(
            sp["name"], self.pool.sizes.astype(np.float64), alpha=sp["alpha"], uniform_mix=sp["uniform_mix"],
            seed=seed, device=self.device,
        )
        self.trainer = SupernetTrainer(
            self.model, self.sampler, self.pool.archs.astype(np.int64), self.train_loader,
            lr_max=sn["lr_max"], lr_min=sn["lr_min"], momentum=sn["momentum"], weight_decay=sn["weight_decay"],
            grad_clip=sn["grad_clip"], label_smoothing=sn["label_smoothing"], bf16=sn["bf16"],
            channels_last=sn["channels_last"], steps_total=self.steps_per_iteration, device=self.device, seed=seed,
            lr_steps_per_epoch=self.steps_per_epoch if sn["lr_schedule"] == "epoch" else None,
            unused_slot_update=sn["unused_slot_update"], graph=sn["graph"],
            data_parallel=GradientSync(self.parallel, check_arch=bool(c.get("distributed", {}).get("check_arch")))
            if self.parallel.enabled else None,
        )
        cc = c["controller"]
        # controller.graph='on' where capture is impossible is refused now, not after a round of supernet training.
        graph_blocker(cc["graph"], torch.device(self.device), 0.0)
        self.controller = NAOController(
            self.space, embedding_size=cc["embedding_size"], hidden_size=cc["hidden_size"],
            mlp_layers=cc["mlp_layers"], mlp_hidden=cc["mlp_hidden"], device=self.device, seed=seed,
        )

    def _dev_batches(self, seed: int):
        """The evaluation data: a :class:`RandomBatches` (``eval_data: random``) or a fixed list of batches."""
        data, sn = self.config["data"], self.config["supernet"]
        random = sn["eval_data"] == "random"
        loader = create_loader(
            data["loader"], self.dev_set, min(sn["eval_batch_size"], len(self.dev_set)), device=self.device,
            augment=False, shuffle=random, drop_last=random, seed=seed + 1, channels_last=sn["channels_last"],
        )
        if random:
            return RandomBatches(loader, int(sn["eval_batches"]))
        batches = []
        for images, labels in loader:
            batches.append((images, labels))
            if len(batches) >= sn["eval_batches"]:
                break
        return batches

    def _sizes(self, archs: np.ndarray) -> np.ndarray:
        """Model size of the stand-alone nets that drives sampling (the search network's N and C by default)."""
        c = self.config
        layers = c["sampler"]["size_layers"] or c["supernet"]["layers"]
        channels = c["sampler"]["size_channels"] or c["supernet"]["channels"]
        return model_size(
            archs, space=self.space, skeleton=c["supernet"]["skeleton"], layers=layers, channels=channels, classes=self.num_classes,
            in_channels=self.in_channels, measure=c["sampler"]["size_measure"],
        )
