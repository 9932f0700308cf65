"""The paper's task-specific comparison rows, each built from a finetuned teacher and written as a model dir that
minimoe-finetune trains and scores like any other:

    prune     KD_x%: heads and FFN neurons pruned by first-order Taylor importance (minimoe-prune)
    moebert   MoEBERT: each FFN split into experts by neuron importance (minimoe-moebert)
    dynabert  DynaBERT: width- and depth-adaptive distillation, sub-networks exported (minimoe-dynabert)
    minidisc  MiniDisc: nested pruned networks trained at once, the teacher assistant chosen among them, then
              teacher -> TA -> student (minimoe-minidisc)

The task-agnostic rows (MiniLM, MiniMoE, TinyBERT, w/ TA) are pipeline.distill's; KD and PKD are finetuning flags.
"""
