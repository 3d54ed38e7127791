"""utils/state_dict.py: one strict loading report (missing, unexpected, wrong shape) for every loader."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from facebooth.utils.state_dict import StateDictMismatchError, check_state_dict, load_strict


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))


def test_report_lists_every_kind_of_mismatch():
    state = _net().state_dict()
    del state["0.bias"]
    state["3.weight"] = torch.zeros(1)
    state["2.weight"] = torch.zeros(5, 4)
    with pytest.raises(StateDictMismatchError) as err:
        check_state_dict(_net().state_dict(), state, source="f.pth", network="toy", hint="Use the toy file.")
    msg = str(err.value)
    assert "f.pth does not match the toy layout" in msg
    assert "1 missing key(s): 0.bias" in msg and "1 unexpected key(s): 3.weight" in msg
    assert "wrong shape: 2.weight (5, 4) (needs (2, 4))" in msg and msg.endswith("Use the toy file.")


def test_load_strict_casts_fills_batch_counters_and_assigns_on_meta():
    ref = _net()
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in ref.state_dict().items() if "num_batches" not in k}
    with torch.device("meta"):
        model = _net()
    load_strict(model, state, source="s", network="toy", assign=True)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(model[0].weight, ref[0].weight.half().float())
    assert int(model[1].num_batches_tracked) == 0
    fp32 = dict(ref.state_dict())
    model2 = load_strict(_net(), fp32, source="s", network="toy", assign=True)
    assert model2[0].weight.data_ptr() == fp32["0.weight"].data_ptr()  # float32: the file's tensor, no copy
