"""Chat rendering, post-instruction tokens and left-padded batches."""

from refusal_kernels.pipeline import chat


def test_post_instruction_ids_are_the_template_suffix(tiny_tokenizer):
    ids = chat.post_instruction_ids(tiny_tokenizer)
    assert tiny_tokenizer.convert_ids_to_tokens(ids) == ["<|end|>", "<|assistant|>"]


def test_batches_are_left_padded_and_map_back_to_prompts(tiny_tokenizer):
    prompts = ["a much longer instruction here", "hi", "medium one"]
    suffix = chat.post_instruction_ids(tiny_tokenizer)
    seen = []
    for batch in chat.batches(tiny_tokenizer, prompts, batch_size=2):
        assert batch.input_ids.shape == batch.attention_mask.shape
        assert (batch.input_ids[:, -len(suffix) :] == batch.input_ids.new_tensor(suffix)).all()
        for row, prompt_index in enumerate(batch.rows):
            ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
            assert ids == chat.encode(tiny_tokenizer, chat.render(tiny_tokenizer, [prompts[prompt_index]]))[0]
            assert batch.attention_mask[row, -1] == 1  # padding on the left only
        seen += batch.rows
    assert sorted(seen) == [0, 1, 2]
