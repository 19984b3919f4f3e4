"""Mutation check of the wiring: each entry of MUTANTS is a one-line change of the kind a refactor
makes to the training loop, its checkpoints and counters, synchronised BatchNorm, the progress
lines or the evaluation's loop. Each is applied to a copy of the repository, where the tests that
cover the changed function run; a change that none of them catches survives, and is listed.

    python .ci/mutants.py                # every mutant: about 7 minutes on a 2-core CPU (425 s last)
    python .ci/mutants.py guard sync     # those whose name holds one of the words

It exits 1 if a mutant survives (or a line to change is not found, once, in its file).
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name, file, the line as it is (stripped, found exactly once), the line it becomes, the tests
# (pytest -k) that cover the function it is in
MUTANTS = [
    # intl.train_one_epoch
    ("loop: schedules over one epoch's steps", "intl.py",
     "total, warmup = args.epochs * steps, args.warmup_epochs * steps",
     "total, warmup = steps, args.warmup_epochs * steps", "closed_form_lr"),
    ("loop: lr not scaled by batch/256", "intl.py",
     "lr = learning_rate(step, total, warmup, args.lr * args.batch_size / 256)",
     "lr = learning_rate(step, total, warmup, args.lr)", "closed_form_lr"),
    ("loop: lr into the first parameter group only", "intl.py",
     "for g in state.optimizer.param_groups:", "for g in state.optimizer.param_groups[:1]:",
     "closed_form_lr"),
    ("loop: m of the next step", "intl.py",
     "m = momentum_at(step, total, args.target_momentum)",
     "m = momentum_at(step + 1, total, args.target_momentum)", "closed_form_lr"),
    ("loop: the sampler never told the epoch", "intl.py",
     "loader.sampler.set_epoch(epoch)", "pass", "closed_form_lr or their_share"),
    ("loop: a resumed epoch starts at its beginning", "intl.py",
     "first = step - epoch * steps                     # > 0: resumed mid-epoch", "first = 0",
     "closed_form_lr or their_share"),
    ("loop: skips counted in batches, not images", "intl.py",
     "loader.sampler.skip = first * loader.batch_size  # the images seen before the checkpoint",
     "loader.sampler.skip = first", "closed_form_lr or their_share"),
    ("loop: no epoch has a last step", "intl.py",
     "guard.after_step(epoch, step, loss, problems, last=i == steps - 1)",
     "guard.after_step(epoch, step, loss, problems, last=True)", "save_every_minutes_by_the_clock"),
    ("loop: progress told the step before", "intl.py",
     "progress.step(i, step, args.batch_size, loss=loss, nmse=distance, trace_loss=tl, lr=lr)",
     "progress.step(i, step - 1, args.batch_size, loss=loss, nmse=distance, trace_loss=tl, lr=lr)",
     "save_every_minutes_by_the_clock"),
    # intl.train_step
    ("step: the EMA weighs the online network by m", "intl.py",
     "update_momentum(target, online, m)", "update_momentum(target, online, 1 - m)",
     "wires_views_target"),
    ("step: the target encodes the second view", "intl.py",
     "z_target = utils.gather(target(views[:1])[0])", "z_target = utils.gather(target(views[1:2])[0])",
     "wires_views_target"),
    ("step: no snapshot for a skipped step", "intl.py",
     "utils.snapshot(state.undo)", "pass", "non_finite_last_step"),
    ("step: the target not put back after a skipped step", "intl.py",
     "state.undo = utils.undo_memory([*online.buffers(), *target_state])",
     "state.undo = utils.undo_memory([*online.buffers()])", "non_finite_last_step"),
    ("step: nothing put back after a skipped step", "intl.py",
     "utils.restore_if_not_finite(state.undo, loss)     # (after the backward, which reads them)",
     "pass", "non_finite_last_step"),
    ("step: gradients accumulate", "intl.py",
     "state.optimizer.zero_grad(set_to_none=True)", "pass", "wires_views_target or resume_is_bit"),
    # intl.build_state
    ("build: BatchNorm not synchronised", "intl.py",
     "online = utils.convert_sync_batchnorm(online)", "pass", "builds_every_bn_synchronised"),
    ("build: CIFAR's decay of every parameter dropped", "intl.py",
     "groups = param_groups(online, args.wd, decay_all=args.decay_all)",
     "groups = param_groups(online, args.wd)", "cifar_run_uses"),
    ("build: every rank's --gpu-aug stream the same", "intl.py",
     "aug = torch.Generator(device).manual_seed(int(torch.randint(2**62, ())))",
     "aug = torch.Generator(device).manual_seed(0)", "two_cpu_processes"),
    # utils.Guard
    ("guard: non-finite losses not counted", "utils.py",
     'count_nonfinite(self.counts["nonfinite"], loss)', "pass", "k_in_a_row_at_the_next"),
    ("guard: no periodic check of the non-finite run", "utils.py",
     "if step % self.check_every == 0:", "if False:", "k_in_a_row_at_the_next"),
    ("guard: the unreadable count never reset", "utils.py",
     'self.counts["unreadable"] = 0', "pass", "unreadable_files_are_replaced"),
    ("guard: the skipped count never reset", "utils.py",
     'self.counts["nonfinite"][0] = 0', "pass", "k_in_a_row_at_the_next"),
    ("guard: no save on time", "utils.py",
     "if (self.stopping or due) and not last:     # mid-epoch (an epoch's end saves anyway)",
     "if self.stopping and not last:", "save_every_minutes_by_the_clock"),
    ("guard: the clock not reset by a save", "utils.py",
     "self.last_save = time.time()", "pass", "save_every_minutes_by_the_clock"),
    ("guard: a signal between steps waits for the next step", "utils.py",
     "if self.stopping or agree([self.stop.signum], self.group)[0]:", "if self.stopping:",
     "during_the_monitor"),
    ("guard: weights saved unchecked", "utils.py",
     "if agree([not finite(unwrap(s.model), s.target)], self.group)[0]:", "if False:",
     "divergence_stops or diverged_evaluation"),
    ("guard: a failed log write never stops the run", "utils.py",
     "stop_if_later(self.group)", "pass", "full_disk_at_each_kind_of_training"),
    # utils.Checkpoints
    ("checkpoints: the counters not saved", "utils.py",
     '"counters": s.counters,', '"counters": None,', "round_trips_every"),
    ("checkpoints: the best accuracy not restored", "utils.py",
     's.best = ckpt.get("best", s.best)', "pass", "round_trips_every"),
    ("checkpoints: the random streams not restored", "utils.py",
     "resume_rng_state(ckpt[\"rng\"], self.rank, s.aug, self.device)", "pass", "round_trips_every"),
    ("checkpoints: the file's lr and weight decay kept", "utils.py",
     "g.update(settings)       # this run's lr, weight decay, fused: the file's buffers only", "pass",
     "allow_changed_args_continues"),
    ("checkpoints: records after the checkpoint kept", "utils.py",
     'drop_log_records_after(os.path.join(self.folder, "log.jsonl"), "step", step)', "pass",
     "hard_killed"),
    ("checkpoints: the step not rescaled to this run's epochs", "utils.py",
     'step = round(ckpt["step"] * now["steps_per_epoch"] / made["steps_per_epoch"])',
     'step = ckpt["step"]', "other_settings_is_refused"),
    ("checkpoints: no exports with an epoch's save", "utils.py",
     "if exports:", "if False:", "end_to_end_two_epochs"),
    # utils.ResumableSampler
    ("sampler: one image too many skipped", "utils.py",
     "return iter(list(super().__iter__())[self.skip:])",
     "return iter(list(super().__iter__())[self.skip + 1:])", "closed_form_lr or their_share"),
    # utils.SyncBatchNorm (the CPU path)
    ("sync BN: the running variance biased", "utils.py",
     "running_var.lerp_((var * (n / (n - 1))).to(running_var.dtype), momentum)",
     "running_var.lerp_(var.to(running_var.dtype), momentum)", "sync_bn"),
    ("sync BN: the count of one rank", "utils.py",
     "n = x.numel() // x.shape[1] * world", "n = x.numel() // x.shape[1]", "sync_bn"),
    ("sync BN: the forward's moments not reduced", "utils.py",
     "start_all_reduce(moments)()     # summed; equal counts: the global moments are their mean",
     "pass", "sync_bn or encoder_with_bn"),
    ("sync BN: compiled, the variance unbiased", "utils.py",
     "var, mean = torch.var_mean(wide, [0, *range(2, x.dim())], correction=0)",
     "var, mean = torch.var_mean(wide, [0, *range(2, x.dim())])", "sync_bn"),
    ("sync BN: the backward's sums not reduced", "utils.py",
     "wait_for_sums = start_all_reduce(sums)  # [sum dy, sum dy x̂] of every rank, in one call",
     "wait_for_sums = start_all_reduce(sums.clone())", "sync_bn or encoder_with_bn"),
    # utils.Progress
    ("progress: no line at an epoch's last step", "utils.py",
     "if step % self.print_freq and i != self.steps - 1:", "if step % self.print_freq:",
     "save_every_minutes_by_the_clock"),
    ("progress: the run's ETA without the later epochs", "utils.py",
     "run_left = left + (self.epochs - self.current - 1) * self.steps", "run_left = left",
     "eta_of_the_epoch"),
    # eval_linear.fit and its loop
    ("eval: a tie makes a new best", "eval_linear.py",
     'improved = acc1 > state.best["acc1"]', 'improved = acc1 >= state.best["acc1"]',
     "holds_its_run_folder_as"),
    ("eval: the val pass's unreadable files not counted", "eval_linear.py",
     'counts["unreadable"] += unreadable       # the val pass\'s too', "pass",
     "eval_linear_replaces_and_counts"),
    ("eval: a stop in the val pass saves nothing", "eval_linear.py",
     "guard.save(epoch, step)", "pass", "cut_by_signals_mid_epoch"),
    ("eval: every epoch's crops seeded, even a resumed one's", "eval_linear.py",
     "if first == 0:      # the crops of an epoch: the same whatever the number of restarts", "if True:",
     "cut_by_signals_mid_epoch"),
    ("eval: a resumed epoch starts at its beginning", "eval_linear.py",
     "loader.sampler.skip = first * loader.batch_size", "loader.sampler.skip = 0",
     "cut_by_signals_mid_epoch"),
    ("eval: a non-finite loss steps", "eval_linear.py",
     "utils.step_if_finite(state.optimizer, loss)", "state.optimizer.step()",
     "diverged_evaluation or evaluation_in_two_ranks"),
    ("eval: each rank decides alone to skip", "eval_linear.py",
     "loss = utils.mean_over_ranks(loss.detach())", "loss = loss.detach()", "evaluation_in_two_ranks"),
    ("eval: k-NN hits of this rank's shard only", "eval_linear.py",
     "hits = utils.sum_over_ranks((pred == q_labels).sum().double())   # of every rank's shard",
     "hits = (pred == q_labels).sum().double()", "score_their_shards"),
]


def mutate(folder, file, old, new):
    """FILE in FOLDER with the one line that reads `old` (stripped) now `new`, indented as it."""
    path = os.path.join(folder, file)
    lines = open(path).read().split("\n")
    at = [i for i, line in enumerate(lines) if line.strip() == old]
    if len(at) != 1:
        return f"found {len(at)} times"
    indent = lines[at[0]][:len(lines[at[0]]) - len(lines[at[0]].lstrip())]
    lines[at[0]] = indent + new
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return ""


def main(words):
    chosen = [m for m in MUTANTS if not words or any(w in m[0] for w in words)]
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "data", "__pycache__", ".pytest_cache")
    survivors, start = [], time.time()
    print(f"{len(chosen)} mutants, each against the tests that cover it", flush=True)
    for n, (name, file, old, new, tests) in enumerate(chosen, 1):
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "repo")
            shutil.copytree(HERE, copy, ignore=ignore)
            problem = mutate(copy, file, old, new)
            if problem:
                verdict = f"not applied: the line is {problem}"
                survivors.append(name)
            else:
                t = time.time()
                p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                    "-m", "not gpu", "test_intl.py", "-k", tests], cwd=copy,
                                   capture_output=True, text=True, timeout=1800)
                ran = "no tests ran" in p.stdout or p.returncode == 5
                verdict = ("killed" if p.returncode not in (0, 5) else "NO TEST SELECTED" if ran
                           else "SURVIVED") + f" ({time.time() - t:.0f} s, -k '{tests}')"
                if not verdict.startswith("killed"):
                    survivors.append(name)
        print(f"{n:2}/{len(chosen)} {name}: {verdict}", flush=True)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} killed in {time.time() - start:.0f} s"
          + (f"; survivors: {', '.join(survivors)}" if survivors else ""), flush=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
