"""Training: the settings every training step has (`config`), building the trainer's parts and saving (`build`),
experiment tracking (`tracking`), running in this process or under `accelerate launch` (`launch`), the trainers in TRL
style (`sft_trainer`, `redi_trainer`, `opsd_trainer`, `onpolicy_trainer`; `rollouts` for the on-policy settings), and
what they share (`token_logprobs`, `template_check`, `privileged_teacher`). Steps import these modules inside their
`train`, so validating a recipe never imports torch."""
