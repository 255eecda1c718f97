"""serving/contract.py: the I/O contract's routes and lists name tensors the models really declare.

The rendered config.pbtxt files are compared with the anchor in tests/test_render.py; here the tables the python
models take from the contract (BLS routes, refused inputs, OutputBuilder's outputs) are checked against it.
"""

from __future__ import annotations

from generator.serving import contract
from generator.serving.triton_models.responder import OutputBuilder


def names(tensors: tuple[contract.Tensor, ...]) -> set[str]:
    return {tensor.name for tensor in tensors}


def test_routes_name_declared_tensors() -> None:
    ensemble_inputs = names(contract.ENSEMBLE.inputs)
    bls_inputs = names(contract.TENSORRT_LLM_BLS.inputs)
    for preprocessing_input, client_input in contract.PREPROCESSING_INPUTS:
        assert preprocessing_input in names(contract.PREPROCESSING.inputs)
        assert client_input in ensemble_inputs and client_input in bls_inputs
    internal = dict(contract.PREPROCESSED)
    assert set(internal) <= names(contract.PREPROCESSING.outputs)
    for route in contract.CORE_INPUTS:
        assert route.key in names(contract.TENSORRT_LLM.inputs), route
        assert route.value in internal.values() if route.preprocessed else route.value in ensemble_inputs, route
    # every required tensorrt_llm input is routed
    required = {tensor.name for tensor in contract.TENSORRT_LLM.inputs if not tensor.optional}
    assert required <= {route.key for route in contract.CORE_INPUTS}


def test_bls_routes_follow_the_ensemble() -> None:
    assert set(contract.preprocessed_core_inputs().values()) == {
        "input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "embedding_bias",
        "stop_words_list", "bad_words_list", "prompt_table_extra_ids"}
    client = contract.client_core_inputs()
    assert client["stream"] == "streaming" and client["top_k"] == "runtime_top_k"
    assert "random_seed" not in client  # pytorch-only route; the BLS maps it to seed itself
    assert set(client) <= names(contract.TENSORRT_LLM_BLS.inputs)


def test_passthrough_and_builder_outputs_are_tensorrt_llm_outputs() -> None:
    core_outputs = names(contract.TENSORRT_LLM.outputs)
    assert set(contract.PASSTHROUGH_OUTPUTS) <= core_outputs
    assert set(OutputBuilder.ALL) | set(contract.COUNT_OUTPUTS) == core_outputs
    for model in (contract.ENSEMBLE, contract.TENSORRT_LLM_BLS):
        assert set(contract.PASSTHROUGH_OUTPUTS) <= names(model.outputs)


def test_refused_inputs_are_optional_inputs() -> None:
    for model in contract.MODELS.values():
        declared = {tensor.name: tensor for tensor in model.inputs}
        for name in model.unsupported_inputs():
            assert declared[name].optional, name
    assert "prompt_embedding_table" in contract.TENSORRT_LLM.unsupported_inputs()
    assert contract.PREPROCESSING.unsupported_inputs() == ("IMAGE_BYTES", "IMAGE_URL", "VIDEO_BYTES")


def test_for_engine_resolves_dtypes_and_backend_only_tensors() -> None:
    types = {contract.LOGITS: "FP16", contract.PROMPT: "BF16", contract.ENCODER: "BF16"}
    pytorch = contract.TENSORRT_LLM.for_engine("pytorch", types)
    tensorrtllm = contract.TENSORRT_LLM.for_engine("tensorrtllm", types)
    assert "random_seed" in names(pytorch.inputs) and "random_seed" not in names(tensorrtllm.inputs)
    by_name = {tensor.name: tensor for tensor in pytorch.outputs}
    assert by_name["context_logits"].triton_type == "TYPE_FP16"
    assert {tensor.name: tensor for tensor in pytorch.inputs}["prompt_embedding_table"].triton_type == "TYPE_BF16"
