"""kvplug.core"""
