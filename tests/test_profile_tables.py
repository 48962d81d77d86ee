"""The tables of ``benchmarks/compare_peers.py --profile`` count what ran.

``copies_by_caller`` groups the copying ops of a ``torch.profiler`` trace by
the op above them; ``onednn_primitives`` reads oneDNN's verbose output, which
oneDNN writes to the process's file descriptor 1.
"""
import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import compare_peers as cp  # noqa: E402


def _rows(table: str):
    """(ms, calls, rest) of each data row of a markdown table."""
    found = []
    for line in table.splitlines():
        m = re.match(r"\| ([0-9.]+) \| ([0-9]+) \| (.*) \|$", line)
        if m:
            found.append((float(m.group(1)), int(m.group(2)), m.group(3)))
    return found


def test_copies_are_grouped_by_the_op_that_called_them():
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(64, 32, 8, 8)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        for _ in range(3):
            x.contiguous(memory_format=torch.channels_last)
        torch.cat([x, x])
    table = cp.copies_by_caller(p.events(), rows=10)
    rows = _rows(table)
    layout = [r for r in rows if r[2].startswith("aten::copy_ | [64, 32, 8, 8] |") and "contiguous" in r[2]]
    assert len(layout) == 1 and layout[0][1] == 3, table
    assert any(r[2].startswith("aten::cat |") and r[1] == 1 for r in rows), table


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_onednn_primitives_count_the_convolutions_and_restore_stdout(capfd):
    x = torch.randn(4, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)

    def run():
        F.conv2d(x, w, padding=1).sum().backward()

    run()
    table = cp.onednn_primitives(run)
    rows = {what: calls for _, calls, what in _rows(table)}
    assert rows.get("convolution forward_training") == 1, table
    assert rows.get("convolution backward_weights") == 1, table
    assert rows.get("convolution forward_training mb4_ic8oc16_ih16oh16kh3sh1dh0ph1_iw16ow16kw3sw1dw0pw1") == 1, table
    total = float(re.search(r"oneDNN primitives: ([0-9.]+) ms", table).group(1))
    assert total > 0
    print("after")
    out = capfd.readouterr().out
    assert out.strip() == "after", "oneDNN's verbose lines leaked, or standard output was not restored"


def test_onednn_table_reads_reorders_by_format_and_shape():
    verbose = "\n".join([
        "onednn_verbose,v1,info,cpu,runtime:OpenMP,nthr:2",
        "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,"
        "src:f32::blocked:abdec::f0 dst:f32::blocked:aBdec64b::f0,,,32x64x64x3x3,0.5",
        "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,"
        "src:f32::blocked:abdec::f0 dst:f32::blocked:aBdec64b::f0,,,32x64x64x3x3,0.25",
        "onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx512_core,forward_training,"
        "src:f32::blocked:acdb::f0 wei:f32::blocked:aBdec64b::f0 dst:f32::blocked:acdb::f0,,alg:convolution_direct,"
        "g32mb5_ic2048oc2048_ih14oh7kh3sh2dh0ph1_iw14ow7kw3sw2dw0pw1,2",
    ])
    rows = [(what, ms, calls) for ms, calls, what in _rows(cp.onednn_table(verbose))]
    conv = "convolution forward_training g32mb5_ic2048oc2048_ih14oh7kh3sh2dh0ph1_iw14ow7kw3sw2dw0pw1"
    assert rows == [("convolution forward_training", 2.0, 1), ("reorder", 0.8, 2),  # 0.75 at one decimal
                    (conv, 2.0, 1), ("reorder abdec -> aBdec64b 32x64x64x3x3", 0.8, 2)]
