"""The training loop: one readable class over swappable parts (graph, model, reducer, metrics).

Every rank holds one partition. An epoch is a full-graph forward over the inner nodes (halo
rows fetched from their owners), a loss normalised by the *global* number of training nodes,
a backward that returns halo gradients to their owners, a bucketed all-reduce (sum) of the
weight gradients, and one Adam step. The sum of the ranks' gradients is therefore the
single-process gradient. BNS (``--sampling-rate``) restricts each epoch's halo to a sample;
PipeGCN (``--pipeline``) feeds the layers last epoch's halo features and gradients while this
epoch's travel in the background; the weight-gradient all-reduce stays exact in every mode.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bns_pipe.comm.pipeline import HaloPipeline
from bns_pipe.comm.reducer import GradReducer
from bns_pipe.errors import BnsPipeError, PartitionError
from bns_pipe.hooks import ByteCounter, EpochContext, build_hook
from bns_pipe.memory import keep_freed_memory
from bns_pipe.nn.model import GNN
from bns_pipe.partition import load_partition, manifest_hash, read_manifest
from bns_pipe.sampling import BoundarySampler, EpochSample
from bns_pipe.train import checkpoint
from bns_pipe.train.config import TrainConfig
from bns_pipe.train.distributed import DistContext, SigtermFlag, restart_count
from bns_pipe.train.evaluation import accuracy_counts, resolve_metric, split_metric
from bns_pipe.train.metrics import (
    MetricsWriter,
    epoch_record,
    median_epochs_per_s,
    memory_now_bytes,
    peak_memory_bytes,
    progress_bar,
    reset_peak_memory,
)
from bns_pipe.train.views import SPLITS, build_view, sparse_input, training_subgraph


class TrainingError(BnsPipeError):
    """Training cannot go on (for example the loss became NaN)."""


class Trainer:
    """Builds one rank's share of the job from a partition directory and trains it."""

    def __init__(self, config: TrainConfig, ctx: DistContext) -> None:
        keep_freed_memory()  # epochs reuse warm pages instead of faulting in new ones
        self.config, self.ctx = config, ctx
        manifest = read_manifest(config.partition_dir)
        if manifest["num_parts"] != ctx.world_size:
            raise PartitionError(
                f"{config.partition_dir} has {manifest['num_parts']} parts but the world size "
                f"is {ctx.world_size}: launch one rank per part"
            )
        self.partition_hash = manifest_hash(config.partition_dir)
        part = load_partition(config.partition_dir, ctx.rank)
        self.hooks = [build_hook(spec) for spec in config.hook]
        for hook in self.hooks:
            part = hook.on_graph(part)
        self.bytes = ByteCounter()
        hooks = [*self.hooks, self.bytes]
        dtype = getattr(torch, config.dtype)
        first_out = config.hidden if config.layers > 1 else part.num_classes
        sparse = sparse_input(part, ctx, config.sparse_features, first_out, config.use_pp)
        features = {"normalize": config.normalize_features, "sparse": sparse}
        self.eval_view = build_view(part, ctx, hooks, dtype, **features)
        self.view, train_part = self.eval_view, part
        if config.inductive:
            train_part = training_subgraph(part, self.eval_view.exchange)
            self.view = build_view(train_part, ctx, hooks, dtype, **features)
        distributed = ctx.world_size > 1
        self.pipeline = None
        if config.pipeline and distributed:
            self.pipeline = HaloPipeline(self.view.exchange, config.feat_smooth, config.grad_smooth)
        self.sampler = None
        if config.sampling_rate < 1.0 and distributed:
            self.sampler = BoundarySampler(
                config.seed,
                ctx.rank,
                ctx.world_size,
                train_part.send_ids,
                train_part.halo_counts,
                config.sampling_rate,
                device=ctx.device,
            )
        self.multilabel, self.num_classes = part.multilabel, part.num_classes
        self.dataset_name = str(manifest.get("dataset", {}).get("name", "custom"))
        self.metric = resolve_metric(
            config.metric, self.dataset_name, self.multilabel, self.num_classes
        )
        self.num_train = int(self._sum(torch.tensor([float(part.train_mask.sum())])))
        if self.num_train == 0:
            raise PartitionError("the partition has no training nodes")

        torch.manual_seed(config.seed)
        self.model = GNN(
            part.x.size(1),
            config.hidden,
            self.num_classes,
            layers=config.layers,
            conv=config.model,
            norm=config.norm,
            dropout=config.dropout,
            seed=config.seed,
            heads=config.heads,
        ).to(ctx.device, dtype)
        for hook in self.hooks:
            hook.on_model(self.model)
        if config.init_from:
            checkpoint.load_initial(self.model, config.init_from)
        for tensor in self.model.state_dict().values():  # identical replicas
            dist.broadcast(tensor, src=0, group=ctx.reduce_group)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.reducer = (
            GradReducer(self.model.parameters(), ctx.reduce_group) if ctx.world_size > 1 else None
        )
        if config.use_pp:
            for view in {id(v): v for v in (self.view, self.eval_view)}.values():
                view.precomputed = self.model.precompute(view.graph, view.x)
        self._samples: dict[int, EpochSample] = {}
        self.startup_comm_bytes = int(self._sum(torch.tensor([float(self.bytes.total())])))
        self.bytes.reset()
        startup_mem = torch.zeros(ctx.world_size, dtype=torch.float64)
        startup_mem[ctx.rank] = memory_now_bytes(ctx.device)
        self.startup_mem = [int(v) for v in self._sum(startup_mem)]
        reset_peak_memory(ctx.device)
        self.state = {
            "epoch": 0,
            "best_val": -1.0,
            "test_at_best": 0.0,
            "best_val_metric": -1.0,
            "test_at_best_metric": 0.0,
            "epoch_times": [],
            "epoch_bytes": [],
            "peak_mem": 0,
        }

    # -- one epoch ------------------------------------------------------------------------

    def loss_and_logits(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward in training mode; the loss is this rank's share of the global mean."""
        self.model.train()
        view = self.view
        logits = self.model(view.graph, view.x, epoch=epoch, precomputed=view.precomputed)
        mask, y = view.masks["train"], view.y
        if self.multilabel:
            target = y[mask].to(logits.dtype)
            loss = F.binary_cross_entropy_with_logits(logits[mask], target, reduction="sum")
            loss = loss / (self.num_train * self.num_classes)
        else:
            loss = F.cross_entropy(logits[mask], y[mask], reduction="sum") / self.num_train
        terms = [t for t in (hook.loss_term() for hook in self.hooks) if t is not None]
        return loss + sum(terms) / self.ctx.world_size, logits

    def forward_backward(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Sample (BNS), forward, backward and gradient all-reduce: the step minus the update.

        Returns this rank's loss share, the logits and the step's times on this rank.
        """
        exchange, graph = self.view.exchange, self.view.graph
        before = (exchange.wait_s, exchange.hidden_s, graph.filter_s)
        start = time.perf_counter()
        sample = self._sample(epoch)
        if self.sampler is not None:
            graph.use_sample(sample, self.sampler.scale, self.config.bns_norm)
        if self.pipeline is not None:
            self.pipeline.start_epoch(sample, self._sample(epoch + 1))
            graph.use_pipeline(self.pipeline)
        sample_s = time.perf_counter() - start if self.sampler is not None else 0.0
        try:
            self.optimizer.zero_grad(set_to_none=True)
            loss, logits = self.loss_and_logits(epoch)
            loss.backward()
            reduce_s = self.reducer.wait() if self.reducer is not None else 0.0
        finally:
            graph.use_sample(None)
            graph.use_pipeline(None)
        times = {
            "comm_s": exchange.wait_s - before[0],
            "comm_hidden_s": exchange.hidden_s - before[1],
            "reduce_s": reduce_s,
            "sample_s": sample_s + graph.filter_s - before[2],
        }
        return loss.detach(), logits.detach(), times

    def _sample(self, epoch: int) -> EpochSample | None:
        """Epoch ``epoch``'s boundary sample (None without BNS); the pipeline asks one epoch
        ahead, so the last two are kept."""
        if self.sampler is None:
            return None
        if epoch not in self._samples:
            self._samples = {e: s for e, s in self._samples.items() if e >= epoch - 1}
            self._samples[epoch] = self.sampler.sample(epoch)
        return self._samples[epoch]

    def train_step(self, epoch: int) -> dict:
        """One epoch's step with the optimiser update; returns this rank's loss and times
        (``hooks``: the seconds each hook reports for the step, by key)."""
        start = time.perf_counter()
        self._tell_hooks(epoch, training=True)  # a weight hook's refresh is the step's work
        loss, _, times = self.forward_backward(epoch)
        self.optimizer.step()
        epoch_time = time.perf_counter() - start
        busy = times["comm_s"] + times["reduce_s"] + times["sample_s"]
        hook_times = {k: v for hook in self.hooks for k, v in hook.epoch_times().items()}
        return {
            "loss": loss,
            "epoch_time_s": epoch_time,
            "compute_s": epoch_time - busy,
            **times,
            "hooks": hook_times,
        }

    def _tell_hooks(self, epoch: int, training: bool) -> None:
        for hook in self.hooks:
            hook.on_epoch(EpochContext(epoch, training, self.config.seed, self.config.epochs))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Exact full-graph scores per split, the same on every rank: ``<split>`` accuracy
        (micro-F1 if multilabel) and ``<split>_metric`` (:attr:`metric`)."""
        self._tell_hooks(self.state["epoch"], training=False)
        self.model.eval()
        view = self.eval_view
        logits = self.model(view.graph, view.x, precomputed=view.precomputed)
        masks = [view.masks[split] for split in SPLITS]
        counts = [accuracy_counts(logits[m], view.y[m], self.multilabel) for m in masks]
        totals = self._sum(torch.stack(counts).double().cpu())  # (split, [num, den])
        scores = {s: float(totals[i, 0] / max(totals[i, 1], 1)) for i, s in enumerate(SPLITS)}
        counted = self.metric == ("f1" if self.multilabel else "accuracy")  # the same number
        for split in SPLITS:
            mask = view.masks[split]
            scores[f"{split}_metric"] = (
                scores[split]
                if counted
                else split_metric(
                    self.metric,
                    self.dataset_name,
                    logits[mask],
                    view.y[mask],
                    view.graph.global_ids[mask],
                    self.multilabel,
                    self.ctx.reduce_group,
                )
            )
        return scores

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train for ``config.epochs`` epochs; returns the final metrics object (all ranks)."""
        cfg, ctx = self.config, self.ctx
        # a node restarted for another node's failure keeps its own count at 0: ask every rank
        counts = torch.tensor([restart_count()])
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=ctx.reduce_group)
        restarts = int(counts)
        resuming = cfg.resume or restarts > 0
        resumed_from = self._resume() if resuming else None
        if not resuming and cfg.checkpoint_dir:
            checkpoint.refuse_used(cfg.checkpoint_dir)
        path = cfg.metrics_jsonl if ctx.is_main else None
        writer = MetricsWriter(path, keep_before=self.state["epoch"] if resuming else None)
        if not writer.has_header:
            writer.header(dataclasses.asdict(cfg), self.partition_hash)
        stop = SigtermFlag()
        progress = progress_bar(ctx.is_main and cfg.progress, self.state["epoch"], cfg.epochs)
        try:
            for epoch in range(self.state["epoch"], cfg.epochs):
                record = self._epoch(epoch, stop.raised)
                writer.write(record)
                progress.update(1)
                progress.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    val=f"{record.get('val_acc', float('nan')):.4f}",
                    s=f"{record['epoch_time_s']:.3f}",
                )
                if record.pop("_stop"):
                    self._checkpoint()
                    raise TrainingError(f"stopped by SIGTERM after epoch {epoch}; checkpointed")
                if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0:
                    self._checkpoint()
            if cfg.checkpoint_dir and (
                cfg.checkpoint_every == 0 or cfg.epochs % cfg.checkpoint_every
            ):
                self._checkpoint()
            if self.pipeline is not None:  # the last epoch's transfers are still in flight
                self.pipeline.drain()
        finally:
            progress.close()
            stop.restore()
        final = {
            "final": True,
            "best_val_acc": self.state["best_val"],
            "test_acc": self.state["test_at_best"],
            "metric": self.metric,
            "best_val_metric": self.state["best_val_metric"],
            "test_metric": self.state["test_at_best_metric"],
            "epochs_per_s": median_epochs_per_s(self.state["epoch_times"]),
            "world_size": ctx.world_size,
            "startup_comm_bytes": self.startup_comm_bytes,
            "comm_bytes_per_epoch": statistics.median(self.state["epoch_bytes"] or [0]),
            "peak_mem_bytes": self.state["peak_mem"],
            "startup_mem_bytes_per_rank": self.startup_mem,
            "restarts": restarts,
            "resumed_from_epoch": resumed_from,
        }
        if self.hooks:
            final["hooks"] = {hook.name: hook.report() for hook in self.hooks}
        writer.write(final)
        writer.close()
        return final

    def _epoch(self, epoch: int, stop_requested: bool) -> dict:
        self.bytes.reset()
        times = self.train_step(epoch)
        peak, sent = peak_memory_bytes(self.ctx.device), self.bytes.total()
        record = {"epoch": epoch}
        record |= epoch_record(times, peak, stop_requested, sent, self.ctx.reduce_group)
        if not math.isfinite(record["loss"]):
            raise TrainingError(
                f"the loss became {record['loss']} at epoch {epoch}; lower --lr or check the "
                "features"
            )
        self.state["epoch_times"].append(record["epoch_time_s"])
        self.state["epoch_bytes"].append(record["comm_bytes"])
        self.state["peak_mem"] = max(self.state["peak_mem"], record["peak_mem_bytes"])
        every = self.config.eval_every
        if (every and (epoch + 1) % every == 0) or epoch + 1 == self.config.epochs:
            start = time.perf_counter()
            scores = self.evaluate()
            record["val_acc"], record["val_metric"] = scores["val"], scores["val_metric"]
            record["eval_time_s"] = time.perf_counter() - start
            state = self.state
            final_form = all(hook.deployed() for hook in self.hooks)
            if final_form and scores["val"] > state["best_val"]:
                state["best_val"], state["test_at_best"] = scores["val"], scores["test"]
                if self.config.checkpoint_dir and self.ctx.is_main:
                    config = dataclasses.asdict(self.config)
                    checkpoint.save_best(self.config.checkpoint_dir, self.model, config, epoch + 1)
            if final_form and scores["val_metric"] > state["best_val_metric"]:
                state["best_val_metric"] = scores["val_metric"]
                state["test_at_best_metric"] = scores["test_metric"]
        self.state["epoch"] = epoch + 1
        return record

    def _checkpoint(self) -> None:
        checkpoint.save(
            self.config.checkpoint_dir,
            self.ctx,
            self.model,
            self.optimizer,
            self.state,
            dataclasses.asdict(self.config),
            rank_state=self.pipeline.state_dict() if self.pipeline is not None else None,
            keep=self.config.keep_checkpoints,
        )

    def _resume(self) -> int | None:
        """Restore the newest complete checkpoint; return its epoch (None: none found)."""
        found = checkpoint.load_latest(
            self.config.checkpoint_dir, self.ctx, self.model, self.optimizer
        )
        if found is None:
            return None
        state, rank_state = found
        # a checkpoint written before --metric existed lacks its keys
        self.state = {"best_val_metric": -1.0, "test_at_best_metric": 0.0, **state}
        if self.pipeline is not None:
            self.pipeline.load_state_dict(rank_state)
        return int(self.state["epoch"])

    def _sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values, group=self.ctx.reduce_group)
        return values
