"""`rtsvc eval`: every clip converted with every configuration, scored against a reference
configuration and the target speaker (configs: parsing; metrics: the scores; runner: conversion and
scoring; report: table, eval.json, eval.png)."""
