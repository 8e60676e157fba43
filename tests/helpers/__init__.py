"""What the tests share, imported as `tests.helpers.<module>` (pytest runs from the project root; conftest.py files
import only these, and no test module imports another):

    models       tiny random-weight models, prompts, the embedded default model and its tokenizer
    generation   running a model over a cache: generate, decode steps, teacher forcing, greedy comparison
    states       what a cache holds: its packed layers, bit-for-bit comparison of two caches
    backends     the attention backends this machine runs (one list for every test parametrised by backend)
    inputs       attention inputs from a spec string (`Case`), and the float64 definition they are checked against
    quant        test data for quantization and the documented-layout reference of `PackedTensor`
    triton_compile, tp_worker   scripts the tests run in a process of their own
"""
