"""The host interface: what a model family must write is enforced, the shared runner picks the
right host for a loaded model, and the public entry points still name the old classes."""

import pytest

from mustdrop.hosts import Host, host_for
from mustdrop.hosts.llava import LlavaHost
from mustdrop.hosts.llava_next import LlavaNextHost


def test_a_host_that_leaves_out_a_required_method_cannot_be_made(tiny):
    class Half(Host):
        family = "half"

        def check(self, config):
            pass

        def inputs(self, img, question):
            return {}, ""

    with pytest.raises(TypeError, match="encode"):
        Half(tiny.model, tiny.processor)


def test_host_for_picks_the_family(tiny):
    host = host_for(tiny.model, tiny.processor)
    assert type(host) is LlavaHost and host.family == "llava" and host.grid == 24
    assert host.query_proj(2) is host.decoder_layers[2].self_attn.q_proj


def test_make_runner_wraps_the_host_and_keeps_the_old_names(tiny, tiny_dir):
    from mustdrop.adapters import LlavaMustDrop, MustDropRunner, make_runner
    runner = make_runner(tiny.model, tiny.processor, str(tiny_dir))
    assert isinstance(runner, MustDropRunner) and isinstance(runner.host, LlavaHost)
    assert isinstance(tiny, LlavaMustDrop) and isinstance(tiny, MustDropRunner)
    assert (runner.grid, runner.num_layers, runner.family) == (tiny.grid, tiny.num_layers, "llava")


def test_next_host_refuses_what_its_grids_cannot_run(tiny):
    with pytest.raises(ValueError, match="layout"):
        LlavaNextHost(tiny.model, tiny.processor, layout="flat")


def test_default_positions_select_along_the_sequence(tiny):
    import torch
    host = host_for(tiny.model, tiny.processor)
    ids = host.decode_position_ids(7, 3, "cpu")
    assert ids.tolist() == [[7, 8, 9]]
    assert host.position_ids_at(ids, slice(1, 2)).tolist() == [[8]]
    cos, sin = host.rotary(torch.zeros(1, 3, 4), ids)
    c1, s1 = host.embeddings_at((cos, sin), torch.tensor([0, 2]))
    assert torch.equal(c1, cos[:, [0, 2]]) and torch.equal(s1, sin[:, [0, 2]])
    assert host.prefill_kwargs({}, 1, 2, 3) == {}
