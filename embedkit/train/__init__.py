"""embedkit.train: tasks, stages, the trainer (plain and cached large-batch steps, checkpoints,
multi-GPU), retrieval evaluation and model soups."""
from .checkpoint import load_model_state
from .data import Example, Task, TaskSampler
from .evaluate import evaluate_retrieval, retrieval_metrics
from .soup import greedy_soup, soup
from .stage import Stage
from .trainer import Trainer, fingerprint_inputs

__all__ = ["Example", "Stage", "Task", "TaskSampler", "Trainer", "evaluate_retrieval", "fingerprint_inputs",
           "greedy_soup", "load_model_state", "retrieval_metrics", "soup"]
