"""Config validation and the flag <-> field correspondence."""

import dataclasses

import pytest
from absl import flags

from experiments import config_flags
from maxrec.config import Config


def test_from_flat_and_flat_round_trip():
  cfg = Config.from_flat(epochs=7, model="lightgcn", split_ratios=(0.7, 0.1, 0.2))
  assert cfg.train.epochs == 7 and cfg.model.model == "lightgcn"
  assert Config.from_flat(**cfg.flat()) == cfg
  assert cfg.replace(epochs=9).train.epochs == 9


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(model="svd"), r"--model='svd' is not one of mf, lightgcn"),
    (dict(epochs=0), r"--epochs=0 must be >= 1"),
    (dict(early_stop_metric="ndcg@30"), r"K in --topk=10,20,50"),
    (dict(bogus=1), r"Unknown config field\(s\): bogus"),
    (dict(split_ratios=(0.5, 0.5)), r"three non-negative numbers"),
    (dict(optimizer="adagrad"), r"--optimizer='adagrad' is not one of adam, sgd"),
    (dict(optimizer="sgd", weighting="uncertainty"), r"use --optimizer=adam"),
  ],
)
def test_invalid_values_are_clear_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    Config.from_flat(**kw)


def test_every_field_is_a_flag_with_the_same_default_but_test_hooks():
  fv = flags.FlagValues()
  config_flags.define_config_flags(fv)
  fv(["prog"])
  assert config_flags.config_from_flags(fv) == Config()
  for group in Config.groups().values():
    for f in dataclasses.fields(group):
      assert (f.name in fv) == (f.name != "inject_nan_at_step"), f.name


def test_every_declared_choice_is_validated():
  """A value outside a field's declared choices is an error naming the flag, for every
  field that declares choices (tuples entry by entry)."""
  checked = 0
  for group in Config.groups().values():
    for f in dataclasses.fields(group):
      if "choices" in f.metadata:
        bad = ("bogus",) if isinstance(f.default, tuple) else "bogus"
        with pytest.raises(ValueError, match=rf"--{f.name}='bogus' is not one of"):
          Config.from_flat(**{f.name: bad})
        checked += 1
  assert checked >= 14  # the fields with choices today


def test_grouped_help_lists_each_group_with_its_flags():
  fv = flags.FlagValues()
  config_flags.define_config_flags(fv)
  text = config_flags.grouped_help(fv)
  heads = [line.split(":")[0] for line in text.splitlines() if line and not line[0].isspace()]
  assert heads == list(Config.groups())
  data, rest = text.split("\nmodel:")
  assert "--split_ratios:" in data and "--meta_lr:" not in data
  assert "--meta_lr:" in rest.split("\nmeta:")[1] and "(default: '0.5')" in text
  assert "inject_nan_at_step" not in text


def test_flags_parse_to_config():
  fv = flags.FlagValues()
  config_flags.define_config_flags(fv)
  fv(
    [
      "prog",
      "--split_ratios=0.6,0.2,0.2",
      "--min_rating=4",
      "--topk=5,10",
      "--early_stop_metric=ndcg@10",
    ]
  )
  cfg = config_flags.config_from_flags(fv)
  assert cfg.data.split_ratios == (0.6, 0.2, 0.2) and cfg.data.min_rating == 4.0
  assert cfg.train.topk == (5, 10)


def test_lightgcn_fast_recipe_defaults_and_mf_defaults():
  lg, mf = Config.from_flat(model="lightgcn"), Config.from_flat(model="mf")
  assert (lg.learning_rate, lg.lr_schedule, lg.eval_every) == (5e-2, "cosine", 4)
  assert lg.model.resolved_init == "spectral"
  assert (mf.learning_rate, mf.lr_schedule, mf.eval_every) == (1e-3, "constant", 1)
  assert mf.model.resolved_init == "normal"
  # LightGCN: about ten steps an epoch, whole 1024s, within [2048, 65536]; MF: 2048.
  assert lg.batch_size_for(664_054) == 65536 and lg.batch_size_for(80_000) == 8192
  assert lg.batch_size_for(3_000) == 2048 and lg.batch_size_for(10_000_000) == 65536
  assert mf.batch_size_for(664_054) == 2048
  # Explicit flags win for either model.
  set_ = Config.from_flat(model="lightgcn", batch_size=2048, learning_rate=1e-3, eval_every=1)
  assert set_.batch_size_for(664_054) == 2048 and set_.learning_rate == 1e-3
  assert set_.eval_every == 1
  assert Config.from_flat(model="lightgcn", lr_schedule="constant").lr_schedule == "constant"
  with pytest.raises(ValueError, match="--lr_schedule='step' is not one of"):
    Config.from_flat(lr_schedule="step")
  with pytest.raises(ValueError, match="--init='svd' is not one of"):
    Config.from_flat(init="svd")


def test_epochs_and_meta_schedule_defaults_follow_the_model():
  lg = Config.from_flat(model="lightgcn", weighting="none")
  lg_aux = Config.from_flat(model="lightgcn", weighting="fixed")
  mf = Config.from_flat(model="mf")
  assert (lg.epochs, lg_aux.epochs, mf.epochs) == (100, 20, 100)
  assert Config.from_flat(model="lightgcn", epochs=7).epochs == 7
  assert lg_aux.meta_every_for(10) == 30 and mf.meta_every_for(36) == 50
  assert Config.from_flat(model="lightgcn", meta_every=4).meta_every_for(10) == 4
  meta = Config.from_flat()  # the main job: softmax meta loss on the validation pairs
  assert (meta.meta.meta_loss, meta.meta.meta_data, meta.meta_ratio) == ("softmax", "valid", 0.0)
  held = Config.from_flat(meta_data="heldout")
  assert held.meta_ratio == 0.1
  with pytest.raises(ValueError, match="--meta_every=0 must be >= 1"):
    Config.from_flat(meta_every=0)


def test_default_validation_schedule_checks_the_first_epochs():
  lg, mf = Config.from_flat(model="lightgcn", epochs=10), Config.from_flat(model="mf", epochs=3)
  assert [e for e in range(1, 11) if lg.validates_after(e)] == [1, 2, 3, 4, 8, 10]
  assert [e for e in range(1, 4) if mf.validates_after(e)] == [1, 2, 3]
  set_ = Config.from_flat(model="lightgcn", epochs=10, eval_every=4)  # as given
  assert [e for e in range(1, 11) if set_.validates_after(e)] == [4, 8, 10]
