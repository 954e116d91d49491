import numpy as np
import torch

from admkit.data import digits_heldout, digits_train
from admkit.judge import judge_outputs, train_judge


def _stack(dataset):
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.as_tensor(np.asarray(dataset.labels))
    return images, labels


def test_judge_classifies_heldout_digits():
    x_train, y_train = _stack(digits_train(16))
    x_test, y_test = _stack(digits_heldout(16))
    judge = train_judge(x_train, y_train, steps=300)
    features, predicted = judge_outputs(judge, x_test)
    assert features.shape == (len(x_test), 128)
    accuracy = (predicted == y_test.numpy()).mean()
    # The held-out digits were never seen; a working judge gets nearly all of them.
    assert accuracy > 0.9, accuracy
