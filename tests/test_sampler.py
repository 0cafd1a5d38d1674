"""The default path's length-grouped sampler: every conversation once per epoch, batches of similar length."""

import random

from sft_trainer import ConversationLengthSampler


def padding_efficiency(order, lengths, batch_size):
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(lengths[i] for i in order) / sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_each_index_once_grouped_and_reproducible():
    rng = random.Random(0)
    lengths = [min(int(rng.lognormvariate(5, 0.7)) + 10, 512) for _ in range(1500)]  # long-tailed, cut, like HH
    sampler = ConversationLengthSampler(lengths, batch_size=16, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(1500)) and len(sampler) == 1500
    assert padding_efficiency(order, lengths, 16) >= 0.95
    assert padding_efficiency(list(range(1500)), lengths, 16) < 0.6  # what random batches give
    assert list(ConversationLengthSampler(lengths, 16, seed=3)) == order  # same seed and epoch: same batches
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_batches_of_a_megabatch_are_not_in_length_order():
    lengths = list(range(16 * 50))
    order = list(ConversationLengthSampler(lengths, batch_size=16, seed=0))
    batch_max = [max(order[i:i + 16]) for i in range(0, len(order), 16)]
    assert batch_max != sorted(batch_max, reverse=True)


def test_short_tail_batch_comes_last_so_boundaries_hold():
    lengths = [100] * 21 + [5] * 20  # 41 conversations in batches of 8: five full batches and a tail of one
    order = list(ConversationLengthSampler(lengths, batch_size=8, seed=1))
    assert lengths[order[-1]] == 5
    batches = [order[i:i + 8] for i in range(0, 40, 8)]
    assert sorted(len({lengths[i] for i in b}) for b in batches) == [1, 1, 1, 1, 2]


def test_two_seeds_give_two_orders_in_the_same_epoch():
    lengths = [10 + (i * 37) % 200 for i in range(400)]
    assert list(ConversationLengthSampler(lengths, 16, seed=1)) != list(ConversationLengthSampler(lengths, 16, seed=2))
