"""kvplug.blend"""
