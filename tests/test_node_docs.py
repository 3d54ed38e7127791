from facebooth.runner.node_docs import render_node_docs


def test_node_docs_list_facebooth_nodes_with_tooltips_only():
    info = {
        "FaceBoothX": {"display_name": "X node", "category": "FaceBooth/face", "description": "does x",
                       "input": {"required": {"a": ["INT", {"default": 3, "tooltip": "the a | value"}]},
                                 "optional": {"m": ["MASK", {"tooltip": "a mask"}]}},
                       "output": ["IMAGE"], "output_name": ["debug"], "output_tooltips": ["shows x"]},
        "KSampler": {"display_name": "KSampler", "category": "sampling", "input": {}, "output": []},
    }
    text = render_node_docs(info)
    assert "### X node (`FaceBoothX`)" in text and "KSampler" not in text
    assert "| `a` | INT | 3 | the a \\| value |" in text
    assert "| `m` (optional) | MASK |  | a mask |" in text
    assert "| `debug` | IMAGE | shows x |" in text
