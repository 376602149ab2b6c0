"""What ESTrainer logs: TRL's reward and completion metrics over every member's rows, and the ES ones (``es/``)."""

from collections import defaultdict

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback

from lightning_es.engine.step_metrics import step_metrics

from .scoring import ScoredRows, weighted_rewards


class ESLogging:
    """Mixin of ``ESTrainer``: fills TRL's metric buffers (``TRLScoring.trl_metrics``) as GRPO would."""

    def _log_rewards(self, mode: str, scored: list[ScoredRows]) -> torch.Tensor:
        """TRL's reward metrics, and what the reward functions gave ``log_metric`` (averaged as GRPO does)."""
        rewards_per_func = torch.cat([rows.rewards for rows in scored])
        metrics = self.trl_metrics(mode)
        for i, name in enumerate(self.reward_func_names):
            column = rewards_per_func[:, i]
            metrics[f"rewards/{name}/mean"].append(column.nanmean().item())
            metrics[f"rewards/{name}/std"].append(column[~column.isnan()].std(unbiased=False).item())
        rewards = weighted_rewards(rewards_per_func, self.reward_weights.cpu())
        valid = rewards[~rewards.isnan()]
        metrics["reward"].append(valid.mean().item())
        metrics["reward_std"].append(valid.std(unbiased=False).item())
        logged = defaultdict(list)
        for rows in scored:
            for name, values in rows.metrics.items():
                logged[name] += values
        for name, values in logged.items():
            metrics[name].append(sum(values) / len(values))
        return valid

    def _log_completions(self, scored: list[ScoredRows], shaped_fitness: torch.Tensor) -> None:
        """GRPO's completion table (``log_completions``) with every member's rows: the advantage column holds the
        member's shaped fitness, and a ``member`` column says whose rows they are."""
        logs = self.trl_completion_logs
        for rows in scored:
            logs["prompt"].extend(rows.prompts)
            logs["completion"].extend(rows.completions)
            for i, name in enumerate(self.reward_func_names):
                logs["rewards"][name].extend(rows.rewards[:, i].tolist())
            logs["advantages"].extend([float(shaped_fitness[rows.member])] * len(rows.prompts))
            logs["extra"]["member"].extend([rows.member] * len(rows.prompts))
            for column in {name for other in scored for name in other.extra}:
                logs["extra"][column].extend(rows.extra.get(column, [None] * len(rows.prompts)))

    def _log_step(self, scored: list[ScoredRows], iteration, lr: float, seconds: float) -> None:
        """TRL's reward and completion metrics over every row any process scored in this step, and the ES ones."""
        everything = [rows for share in gather_object([scored]) for rows in share]
        self._log_rewards("train", everything)
        if self.log_completions:
            self._log_completions(everything, iteration.shaped(self.es))
        lengths = torch.tensor([n for rows in everything for n in rows.completion_lengths], dtype=torch.float64)
        truncated = torch.tensor([t for rows in everything for t in rows.truncated])
        self.state.num_input_tokens_seen += int(lengths.sum()) + sum(sum(rows.prompt_lengths) for rows in everything)
        metrics = self.trl_metrics("train")
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        metrics["completions/mean_length"].append(lengths.mean().item())
        metrics["completions/min_length"].append(lengths.min().item())
        metrics["completions/max_length"].append(lengths.max().item())
        metrics["completions/clipped_ratio"].append(truncated.double().mean().item())
        terminated = lengths[~truncated] if (~truncated).any() else torch.zeros(1, dtype=torch.float64)
        metrics["completions/mean_terminated_length"].append(terminated.mean().item())
        metrics["completions/min_terminated_length"].append(terminated.min().item())
        metrics["completions/max_terminated_length"].append(terminated.max().item())
        in_place = self.args.es_optimizer == "sgd"
        for name, value in step_metrics(iteration, self.es, self.args, lr if in_place else None).items():
            if name == "es/learning_rate":
                continue  # transformers logs it as learning_rate
            metrics[name].append(value)
        metrics["step_time"].append(seconds)

    def scheduled_step(self) -> float:
        """The ES step now: the settings' step times the schedule's factor (its current rate over its base rate).
        The factor, not the rate: a resumed scheduler keeps the base rate its checkpoint was written with (0.1.0's
        default learning_rate was 1e-4, a value the step never used under relative noise)."""
        if self.lr_scheduler is None:
            return self.args.step_size()
        base = self.lr_scheduler.base_lrs[0]
        factor = self.lr_scheduler.get_last_lr()[0] / base if base else 1.0
        return self.args.step_size(self.args.learning_rate * factor)

    def _get_learning_rate(self):
        """The step ES takes, in the units of the noise (the value that, as ``learning_rate``, runs the same step);
        with es_optimizer="trainer" the optimizer's own rate."""
        if self.args.es_optimizer == "trainer":
            return super()._get_learning_rate()
        return self.scheduled_step()

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        """``grad_norm`` is left out under the in-place step, as transformers leaves out a None: there is no loss
        gradient, and the ES estimate's norm (``es/grad_estimate_norm``) reads as divergence beside a GRPO run's. With
        es_optimizer="trainer" the Trainer measures the ``.grad`` its optimizer steps on, as usual."""
        if self.args.es_optimizer == "sgd":
            grad_norm = None
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)


class _AppliedUpdateNorm(TrainerCallback):
    """With ``es_optimizer="trainer"`` the Trainer's optimizer takes the step after ``training_step``: log the norm of
    the change it made as ``es/update_norm`` (the applied step, as under "sgd"), and adopt it into the fp32 master."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        es = self.trainer.es
        squared = 0.0
        for name, p in es.params.items():
            squared += float((p.detach().double() - es.master.value(name).double()).pow(2).sum())
        es.master.sync_from_model()
        self.trainer.trl_metrics("train")["es/update_norm"].append(es.perturbation.total_squared_norm(squared) ** 0.5)
