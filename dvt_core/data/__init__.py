"""Images and data sets: safe image reading and preprocess, Fashion-MNIST, image folders, held-out splits."""
