from dist_moe.config import head_dim, load_config
from dist_moe.train.flops import training_flops_per_token


def _cfg(*overrides):
    return load_config("tiny", list(overrides))


def test_full_attention_is_palm_formula():
    cfg = _cfg("data.seq_len=1024", "model.max_seq_len=1024")
    m = cfg.model
    d_attn = m.num_heads * head_dim(m)
    assert training_flops_per_token(cfg, 1000) == 6 * 1000 + 12 * m.num_layers * d_attn * 1024


def test_moba_layers_count_their_chosen_blocks_and_own_block():
    cfg = _cfg("data.seq_len=4096", "model.max_seq_len=4096", "model.attention=moba", "moba.block_size=128",
               "moba.top_k=3", "moba.full_attention_last_layers=1")
    m = cfg.model
    d_attn = m.num_heads * head_dim(m)
    keys = (m.num_layers - 1) * (3 + 1) * 128 + 1 * 4096  # MoBA layers: 3 chosen + own block; the last is full
    assert training_flops_per_token(cfg, 0) == 12 * d_attn * keys
    short = _cfg("data.seq_len=256", "model.max_seq_len=256", "model.attention=moba", "moba.block_size=128",
                 "moba.top_k=3")
    assert training_flops_per_token(short, 0) == 12 * d_attn * m.num_layers * 256  # fewer keys exist than 4 blocks


def test_sliding_window_counts_the_window():
    cfg = _cfg("data.seq_len=1024", "model.max_seq_len=1024", "model.attention_window=100")
    m = cfg.model
    assert training_flops_per_token(cfg, 0) == 12 * m.num_heads * head_dim(m) * m.num_layers * 100
