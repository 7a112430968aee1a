"""Every configuration field, commented, at the original 1B-pairs recipe.

The recipe of all-MiniLM-L6-v2 / multi-qa-MiniLM-L6-cos-v1 and the mpnet
models of the Flax/JAX community week: global batch 1024 (128 per TPU v3
core), AdamW lr 2e-5, 500 warmup steps then linear decay, grad-norm clip 1.0,
max length 128, mean pooling, cosine similarity x 20, symmetric in-batch
negatives loss.

Other configs start from this one and change what their recipe changes.

    python train.py --config configs/default.py --workdir runs/default \
        --config.model.init=PATH_OR_HUB_ID
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Every number below must be finite (nan and inf are refused at start-up).

    # ---- Run length, seeds, logging ----
    config.total_steps = 100_000  # optimizer updates; 0 = import-only run (checkpoint the init)
    config.seed = 0  # seeds parameter init, dropout and the data order
    config.log_every = 100  # steps between metric lines (console, metrics.jsonl, TensorBoard)
    config.eval_every = 5_000  # steps between evaluations; 0 = only at the start and the end
    config.eval_at_start = True  # evaluate the starting model before the first step
    config.checkpoint_every = 5_000  # steps between checkpoints (the last step always saves)
    config.keep_checkpoints = 3  # newest checkpoints kept in WORKDIR/checkpoints
    # e.g. "eval/retrieval/mrr@10" or "eval/mean": also keep the best step in WORKDIR/best
    config.best_metric = ""
    config.best_mode = "max"  # "max" or "min": which direction of best_metric is better
    config.resume_from = ""  # checkpoint step folder to start from when WORKDIR has none

    # ---- Data (see data/README.md) ----
    config.data_folder = "data"  # local path or gs:// bucket; data_config names are relative to it
    config.data_config = "data_config.json"  # the mixture: [{"name", "lines", "weight"}, ...]
    # GLOBAL batch in rows (pairs/triplets), over all devices and hosts; a multiple of
    # data.datasets_per_batch x processes and of the device count (checked at start-up).
    config.batch_size = 1024
    config.data = ml_collections.ConfigDict(
        dict(
            # Groups per global batch, each group from one dataset (the 1B recipe: 2, hard
            # in-batch negatives). = batch_size draws rows independently, as
            # sentence-transformers' sampler does. More groups helped retrieval over a corpus
            # that mixes all datasets (the quickstart uses 8: bench/README.md, Quality).
            datasets_per_batch=2,
            max_length_anchor=128,  # token limit for column 0 (query/anchor)
            max_length_document=128,  # token limit for the other columns
            buckets=(32, 64, 128),  # padded lengths; () pads every batch to the max length
            shuffle_buffer=100_000,  # lines held in memory when shuffling a streamed file
            skip_duplicates=True,  # skip an example whose text already appears in the batch
            max_bad_line_share=0.01,  # stop if a dataset's malformed-line share passes this
            prefetch=4,  # batches prepared ahead in a background thread
            # Processes that tokenize and pad while the background thread only mixes
            # (one core each); 0 = the thread does it all. Same batches for any value.
            # A GPU or TPU host feeding a small model fast wants several.
            workers=0,
            # Rows {"query": q, "pos": [...], "neg": [...]} (or anchor/positive/negative):
            # 0 = the first element of each list; k > 0 = one positive and k negatives
            # drawn from the lists at every use, from (seed, epoch, line), so a resumed
            # run draws the same (Tevatron's train_group_size = k + 1).
            negatives_per_row=0,
            # Prompts (instructions) prepended to the texts before tokenizing, so the max
            # lengths count their tokens: "query" to column 0 (anchor/query), "document" to
            # the other columns, in training, evaluation and the exported model
            # (sentence-transformers' prompts: encode_query/encode_document use them). A
            # data_config entry's "prompts" replace these for its dataset, key by key. E.g.
            # --config.data.prompts.query="query: " --config.data.prompts.document="passage: "
            prompts=ml_collections.ConfigDict(dict(query="", document="")),
        )
    )

    # ---- Model ----
    config.model = ml_collections.ConfigDict(
        dict(
            # Local folder (Hugging Face or sentence-transformers) or Hub id of the
            # pretrained encoder; "" = random init from the sizes below.
            init="",
            # Untied towers only: init of the document tower ("" = same as init).
            document_init="",
            tied=True,  # one encoder for queries and documents; False = two towers
            # Pooling: "cls" | "mean" | "max" | "mean_sqrt_len_tokens";
            # unset = what the init's sentence-transformers folder says, else "mean".
            pooling=config_dict.placeholder(str),
            # L2-normalise embeddings; unset = as the init says, else False.
            normalize=config_dict.placeholder(bool),
            # False = leave the prompt's tokens (config.data.prompts, with the leading [CLS])
            # out of the pooling, as sentence-transformers' Pooling(include_prompt=False);
            # the encoder still attends to them. Written into the exported Pooling config.
            include_prompt=True,
            # Prompt that sentence-transformers' plain encode() of the exported model uses:
            # "" (none) | "query" | "document" (a key of config.data.prompts with a
            # non-empty prompt).
            default_prompt_name="",
            dtype="float32",  # compute dtype: "float32" or "bfloat16" (parameters stay float32)
            remat=False,  # recompute each layer's activations in the backward pass
            # Attention: "auto" = fused Pallas kernels (models/kernels/) on GPUs
            # where they beat XLA (head size 64, lengths <= 128), on TPUs wherever
            # they fit (whole heads per 128 lanes, lengths <= 512: the compiled step
            # moves fewer bytes), else XLA; "xla"; "pallas" wherever they fit
            # (interpreted, slowly, off a GPU or TPU). Same results and dropout
            # masks either way.
            attention_kernel="auto",
            # Run embeddings, projections, feed-forward and LayerNorms on real tokens
            # only (attention stays padded; same result, ~1/(1 - padding share)
            # less work there). N > 0 rounds each column's packed size up to one of
            # N steps of its padded size, so at most N shapes compile per padded
            # shape; 0 = compute on padding too. Ignored with grad_cache_chunk.
            # Unset (auto): 0 on a TPU, where the compiled step was cheaper without
            # packing (bench/README.md, "Compiled for a TPU"), 8 on CPUs and GPUs.
            pack_levels=config_dict.placeholder(int),
            dropout=True,  # dropout during training (rates from the encoder config)
            # Tokenizer folder or Hub id; "" = the init's tokenizer.
            tokenizer="",
            # Architecture for random init (ignored when init is set).
            # "bert" | "distilbert" | "mpnet" | "roberta" | "xlm-roberta" | "modernbert"
            model_type="bert",
            vocab_size=30522,
            hidden_size=384,
            num_layers=6,
            num_heads=12,
            intermediate_size=1536,
            max_position_embeddings=512,
        )
    )

    # ---- Loss ----
    config.loss = ml_collections.ConfigDict(
        dict(
            # "mnrl": in-batch negatives softmax. "gist": the same with guided false-negative
            # filtering (sentence-transformers' GISTEmbedLoss; needs guide.init).
            # Distillation from teacher labels in the rows (data/README.md, "Teacher
            # labels"): "margin_mse" (margin or scores rows, k >= 1 negatives), "distill_kl"
            # (listwise KL to teacher scores; scores rows), "embedding_mse" (MSE to teacher
            # embeddings; embedding rows).
            kind="mnrl",
            similarity="cosine",  # "cosine" or "dot" (also written into the exported model)
            scale=20.0,  # logits = scale * similarity (1.0 for dot product)
            # "pairs": symmetric (a->b and b->a averaged) for pairs, one-way when the
            # batch has hard negatives; "always"; "never".
            symmetric="pairs",
            mask_false_negatives=True,  # drop candidates whose text equals the anchor's positive
            matryoshka_dims=(),  # e.g. (384, 256, 128, 64): loss summed over truncated sizes
            matryoshka_weights=(),  # one weight per dim; () = all 1
            # "distill_kl" only: softmax temperature of student and teacher scores
            # (the loss is multiplied by its square, as sentence-transformers does).
            temperature=1.0,
            # kind "gist" only: a frozen guide model scores the same global batch in every
            # step; in-batch candidates it scores above the anchor's positive are masked.
            # Use scale=100 (GIST's temperature 0.01) and cosine to match sentence-transformers.
            # mask_false_negatives does not apply; a copy of the positive scores equal to it,
            # not above, so margin=0 keeps it (any margin > 0 masks it).
            guide=ml_collections.ConfigDict(
                dict(
                    # Local folder or Hub id of any supported encoder with the model's
                    # tokenizer (loaded like model.init); never trained, not checkpointed.
                    init="",
                    # "absolute": mask when guide(a, c) > guide(a, pos) - margin;
                    # "relative": when guide(a, c) > guide(a, pos) * (1 - margin) (pos > 0).
                    margin_strategy="absolute",
                    margin=0.0,  # 0 = mask whatever the guide scores above the positive
                    contrast_anchors=True,  # also contrast each anchor with the other anchors
                    contrast_positives=True,  # and each positive with the other positives
                )
            ),
        )
    )

    # ---- Optimizer ----
    config.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=2e-5,  # peak learning rate
            warmup_steps=500,  # linear warmup from 0
            schedule="linear",  # decay after warmup: "linear" | "cosine" | "constant"
            weight_decay=0.01,  # AdamW decay, not applied to biases and LayerNorm
            b1=0.9,  # Adam first-moment decay
            b2=0.999,  # Adam second-moment decay
            eps=1e-6,  # Adam epsilon (transformers' AdamW default, used by the original)
            grad_clip_norm=1.0,  # global-norm clipping; 0 = off
        )
    )

    # ---- Parallelism and memory ----
    config.mesh = ml_collections.ConfigDict(
        dict(
            data=-1,  # devices on the batch axis; -1 = all devices not used by fsdp
            fsdp=1,  # devices that also split the parameters (large models)
        )
    )
    config.grad_cache_chunk = 0  # rows per GradCache chunk (global); 0 = plain step

    # ---- Evaluation during training ----
    config.eval = ml_collections.ConfigDict(
        dict(
            sts_file="data/stsbenchmark.tsv.gz",  # STS benchmark; "" disables
            sts_split="dev",  # "train" | "dev" | "test"
            # Retrieval set (Debian JSONL or a BEIR folder such as
            # data/debian_retrieval_dev); "" disables.
            retrieval_file="data/debian_retrieval_dev.jsonl.gz",
            max_queries=0,  # retrieval queries used (0 = all); the corpus is always whole
            # Texts per encoding batch, split over all devices (rows rounded up to a
            # multiple of the device count).
            batch_size=128,
            # Compute dtype of evaluation encoding: "auto" = bfloat16 on a GPU or TPU
            # and the model's dtype on a CPU; "float32" | "bfloat16". Parameters stay
            # float32. bfloat16 numbers can differ from the float32 export's in the
            # third decimal: set "float32" to select checkpoints on exact numbers.
            dtype="auto",
            # More tasks, each logged as eval/<name>/<metric> (after sts_file's and
            # retrieval_file's): dicts with name, kind ("sts" | "retrieval" |
            # "reranking" | "pair_classification"), data (file, BEIR folder, Hub
            # id or "NanoBEIR"), optional split and max_queries. See
            # embeddings/evaluation/tasks.py and data/README.md, e.g.
            # (dict(name="graded", kind="retrieval", data="data/debian_graded"),)
            tasks=(),
            # "<task name>/<metric>" keys averaged into eval/mean (a best_metric that
            # weighs several tasks), e.g. ("sts/spearman_cosine", "retrieval/ndcg@10").
            mean_of=(),
        )
    )
    return config
